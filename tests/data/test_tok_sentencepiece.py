"""Llama 2 sentencepiece tokenizer against the sentencepiece library itself (the oracle), on a
tiny model trained inside the test, plus the [INST] chat format."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.tokenizers import Message, SentencePieceTokenizer, load_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Llama 2 uses a sentencepiece BPE model with byte fallback.",
    "[INST] What is the capital of France? [/INST] Paris is the capital.",
    "<<SYS>> You are a helpful assistant. <</SYS>>",
    "Numbers like 12345 and 3.14159 appear too; so do tabs\tand newlines.",
    "café naïve über привет мир",
] * 30


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=buf,
        vocab_size=400,  # 256 byte-fallback pieces + ~60 chars + merges
        model_type="bpe",
        byte_fallback=True,
        # Llama 2's normalizer keeps whitespace as is; mirror it so trailing spaces matter
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("llama2tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def oracle(model_file) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_file))


@pytest.fixture(scope="module")
def tok(model_file):
    return load_tokenizer(model_file)


TEXTS = [
    "",
    "Hello world",
    " leading space",
    "trailing space ",
    "two  spaces and\nnewline\n",
    "The capital of France is Paris.",
    "日本語 and emoji 🙂 fall back to bytes",
    "<s> [INST] special text </s>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_sentencepiece(tok, oracle, text):
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode(text, add_bos=False) == oracle.encode(text)
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == oracle.bos_id() and ids[-1] == oracle.eos_id()
    assert tok.decode(ids) == oracle.decode(ids)


def test_special_ids(tok, oracle):
    assert tok.bos_id == oracle.bos_id() == 1
    assert tok.eos_id == oracle.eos_id() == 2
    assert tok.pad_id == 0  # no pad piece -> 0 (<unk>)
    assert tok.stop_tokens == [tok.eos_id]
    assert tok.vocab_size == oracle.get_piece_size()
    # control-token text typed by a user stays text
    assert tok.bos_id not in tok.encode("<s>hi</s>", add_bos=False)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_decode_like_library_hypothesis(tok, oracle, s):
    ids = tok.encode(s, add_bos=False)
    assert ids == oracle.encode(s)
    assert tok.decode(ids) == oracle.decode(ids)


def test_inst_format_and_masks(tok, oracle):
    msgs = [
        Message("system", "Be brief."),
        Message("user", "Hi there"),
        Message("assistant", "Hello!"),
        Message("user", "Capital of France?"),
        Message("assistant", "Paris"),
    ]
    ids, mask = tok.tokenize_messages(msgs)
    assert len(ids) == len(mask)
    # oracle: Meta's chat_completion layout, each turn encoded as one string with bos+eos
    turn1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! "
    turn2 = "[INST] Capital of France? [/INST] Paris "
    bos, eos = oracle.bos_id(), oracle.eos_id()
    expected = [bos, *oracle.encode(turn1), eos, bos, *oracle.encode(turn2), eos]
    assert ids == expected
    # trainable positions: the assistant answers (with the trailing space piece) + </s>
    trained = [i for i, m in zip(ids, mask) if not m]
    assert trained == oracle.encode("Hello! ") + [eos] + oracle.encode("Paris ") + [eos]
    assert mask[0] is True
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>[INST] <<SYS>>")


def test_generation_prompt_and_lonely_system(tok, oracle):
    ids, mask = tok.tokenize_messages([Message("user", "Q")], add_generation_prompt=True)
    assert ids == [oracle.bos_id(), *oracle.encode("[INST] Q [/INST]")]
    assert all(mask)
    ids, mask = tok.tokenize_messages([Message("system", "S"), Message("assistant", "A")])
    text = "[INST] <<SYS>>\nS\n<</SYS>>\n\n [/INST] A "
    assert tok.decode(ids) == oracle.decode(oracle.encode(text))
