"""load_tokenizer: where it looks, how it detects the format, and its errors."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from tunelab.data.tokenizers import (
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
)
from tunelab.errors import DataError


def _tiktoken_bytes() -> bytes:
    ranks = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w"]
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)).encode()


@pytest.fixture(scope="module")
def sp_bytes() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world, tiny sentencepiece model"] * 50),
        model_writer=buf,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    return buf.getvalue()


def _hf_json() -> str:
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        show_progress=False,
    )
    tk.train_from_iterator(["hello world"] * 20, trainer)
    return tk.to_str()


def test_folder_with_tiktoken_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_tiktoken_bytes())
    (tmp_path / "tokenizer.json").write_text("not even json")  # tokenizer.model wins
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T"}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer) and tok.chat_format == "llama3"
    # "hello" is a whole token (rank 259); " world" = " w" (260) + single bytes
    assert tok.encode("hello world", add_bos=False) == [259, 260, *b"orld"]
    assert tok.bos_id == 261 and tok.encode("x")[0] == 261
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.chat_template == "T"
    assert tok.vocab_size == 261 + 256


def test_original_subfolder_sentencepiece(tmp_path, sp_bytes):
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(sp_bytes)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "D"}]})
    )
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.chat_format == "llama2"
    assert tok.chat_template == "D"
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_only_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(_hf_json())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.chat_template is None
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_tokenizer(tmp_path).chat_template == "J"
    assert tok.chat_format is None  # no Llama 3 header tokens
    with pytest.raises(DataError, match="chat format"):
        tok.tokenize_messages([{"role": "user", "content": "hi"}])
    assert tok.decode(tok.encode("hello world")) == "hello world"
    # file path works too
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("hello") == tok.encode("hello")


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01garbage\xff")
    with pytest.raises(DataError, match="not a recognised tokenizer"):
        load_tokenizer(tmp_path)
    bad.write_bytes(b"\x0a\x05junk!")  # looks like a protobuf, is not a model
    with pytest.raises(DataError, match="not a valid sentencepiece model"):
        load_tokenizer(bad)
    bad.write_text("aGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(DataError, match="line 2"):
        load_tokenizer(bad)
    bad.write_text("aGVsbG8= 0\n")  # valid line, but no single-byte tokens
    with pytest.raises(DataError, match="single-byte"):
        load_tokenizer(bad)
    bad.unlink()
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="JSON"):
        load_tokenizer(tmp_path)
    # errors are one line
    try:
        load_tokenizer(tmp_path)
    except DataError as e:
        assert "\n" not in str(e)


def test_tiktoken_file_details(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_tiktoken_bytes().replace(b"\n", b"\n\n", 3))  # blank lines are fine
    tok = load_tokenizer(path)
    assert tok.encode("hello", add_bos=False) == [259]
    path.write_bytes(_tiktoken_bytes() + b"aGU= 999\n")  # "he" again with another rank
    with pytest.raises(DataError, match="repeats"):
        load_tokenizer(path)


def test_dict_messages(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_tiktoken_bytes())
    tok = load_tokenizer(tmp_path)
    ids, mask = tok.tokenize_messages(
        [
            {"role": "user", "content": "hello", "name": "x"},
            {"role": "assistant", "content": "hello"},
        ]
    )
    assert len(ids) == len(mask) and mask.count(False) == 2  # "hello" + <|eot_id|>
    with pytest.raises(DataError, match="role"):
        tok.tokenize_messages([{"content": "no role"}])
    with pytest.raises(DataError, match="string"):
        tok.tokenize_messages([{"role": "user", "content": None}])
