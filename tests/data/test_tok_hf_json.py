"""Byte-level BPE tokenizer.json against the HF ``tokenizers`` library (the oracle, test-only),
on tiny tokenizers trained inside the test: Llama 3 layout (Split regex + ByteLevel without
regex), GPT-2 layout (ByteLevel with its own regex), and ids that do not follow merge order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from tunelab.data.tokenizers import LLAMA3_SPLIT_PATTERN, Message, load_tokenizer  # noqa: E402
from tunelab.data.tokenizers.hf_json import bytes_to_unicode  # noqa: E402
from tunelab.errors import DataError  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we'll train 12345 models!",
    "Llama 3 uses a byte-level BPE; café, naïve, über, 日本語のテキスト, привет мир, 🙂🚀.",
    "    def f(x):\n        return x ** 2  # squares\n\n\tTabs\tand  double  spaces.\r\n",
    "Numbers 1 22 333 4444 55555 and punctuation!!! ??? ... --- ***",
] * 25
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def _train(style: str) -> Tokenizer:
    # real Llama 3 tokenizer.json files set ignore_merges (whole-word lookup, like tiktoken)
    tk = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # gpt2
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.encode_special_tokens = True  # oracle treats "<|eot_id|>" in text as text, like us
    return tk


def _write(folder: Path, tk: Tokenizer, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["llama3", "gpt2"])
def pair(request, tmp_path_factory):
    oracle = _train(request.param)
    folder = _write(
        tmp_path_factory.mktemp(request.param),
        oracle,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
    )
    return load_tokenizer(folder), oracle


TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "It's they're WE'LL",
    "1234567890 3.14159 42",
    "   leading and trailing   ",
    "\n\n\nnewlines\r\n\r\n  \n",
    "tabs\t\tand\u00a0nbsp",
    "café 日本語 привет 🙂🚀👩‍👩‍👧 unseen: ẞ ǅ ﷺ",
    "def f(x):\n    return x ** 2\n",
    "special <|eot_id|> text <|begin_of_text|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tokenizers(pair, text):
    tok, oracle = pair
    assert tok.encode(text, add_bos=False) == oracle.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


def test_specials_config_and_chat(pair):
    tok, oracle = pair
    assert tok.bos_id == oracle.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == oracle.token_to_id("<|eot_id|>")  # from tokenizer_config.json
    assert tok.pad_id == oracle.token_to_id("<|finetune_right_pad_id|>")
    stops = {oracle.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    assert set(tok.stop_tokens) == stops
    assert tok.vocab_size == oracle.get_vocab_size()
    assert tok.chat_template == LLAMA3_TEMPLATE and tok.renders_template()
    ids = tok.encode("x <|eot_id|>", add_bos=False)
    assert tok.eos_id not in ids
    msgs = [Message("user", "Hi"), Message("assistant", "Hello there")]
    ids, mask = tok.tokenize_messages(msgs, add_generation_prompt=False)
    rendered = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello there<|eot_id|>"
    )
    oracle.encode_special_tokens = False
    try:
        assert ids == oracle.encode(rendered, add_special_tokens=False).ids
    finally:
        oracle.encode_special_tokens = True
    trained = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(trained, skip_special_tokens=False) == "Hello there<|eot_id|>"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_roundtrip_and_ids_hypothesis(pair, s):
    tok, oracle = pair
    ids = tok.encode(s, add_bos=False)
    assert tok.decode(ids) == s
    assert ids == oracle.encode(s, add_special_tokens=False).ids


def test_ids_not_in_merge_order(tmp_path):
    """Shuffle every id: segmentation (driven by merge order) must not change, ids must follow."""
    tk = _train("llama3")
    data = json.loads(tk.to_str())
    vocab = data["model"]["vocab"]
    perm = list(range(len(vocab)))
    random.Random(0).shuffle(perm)
    data["model"]["vocab"] = {t: perm[i] for t, i in vocab.items()}
    for t in data["added_tokens"]:
        t["id"] = perm[t["id"]]
    # merges may be stored as [a, b] pairs in newer files
    merges = data["model"]["merges"]
    data["model"]["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    oracle = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == oracle.token_to_id("<|begin_of_text|>")  # fallback by name
    for text in TEXTS[:-1] + [c * 3 for c in CORPUS[:4]]:
        ids = tok.encode(text, add_bos=False)
        assert ids == oracle.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


def test_bytes_to_unicode_is_gpt2_alphabet():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("A")] == "A"
    assert sorted(m.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_unsupported_models_raise(tmp_path):
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="WordPiece"):
        load_tokenizer(tmp_path)
    # sentencepiece-style BPE (metaspace, no byte-level alphabet)
    sp_bpe = Tokenizer(models.BPE({"▁a": 0, "a": 1, "▁": 2}, [("▁", "a")]))
    sp_bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    sp_bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# Llama 3 (3.0) chat template as published in Meta-Llama-3-8B-Instruct's tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_matches_transformers_chat_template(tmp_path):
    """The built-in Llama 3 chat format (used for folders without a template) gives the ids
    transformers' apply_chat_template gives with the official Llama 3 template."""
    transformers = pytest.importorskip("transformers")
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    folder = _write(tmp_path, _train("llama3"), cfg)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), **cfg
    )
    tok = load_tokenizer(folder)
    convo = [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  What is 2+2?\n\n"},
        {"role": "assistant", "content": "4 🙂"},
        {"role": "user", "content": "And 3+3? café"},
    ]
    for gen in (False, True):
        expected = hf.apply_chat_template(
            convo, chat_template=LLAMA3_TEMPLATE, tokenize=False, add_generation_prompt=gen
        )
        expected_ids = hf(expected, add_special_tokens=False)["input_ids"]
        ids, mask = tok.tokenize_messages(convo, add_generation_prompt=gen)
        assert ids == expected_ids
        assert len(mask) == len(ids)


def test_plain_added_tokens_are_matched_in_text(tmp_path):
    """Added tokens with special=false are split out of the text, as `tokenizers` does."""
    tk = _train("llama3")
    tk.add_tokens(["<|tool|>"])  # non-special added token
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    tool = tk.token_to_id("<|tool|>")
    for text in ["call <|tool|> now", "<|tool|><|tool|>x", "no tool <|eot_id|>"]:
        ids = tok.encode(text, add_bos=False)
        assert ids == tk.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tool in tok.encode("a<|tool|>b")


def test_prefix_space_and_nfkc(tmp_path):
    """GPT-2 style ByteLevel(add_prefix_space=True) with an NFKC normalizer."""
    tk = Tokenizer(models.BPE())
    tk.normalizer = tokenizers.normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    tk.train_from_iterator(["hello world foo bar \ufb01ne \u2460"] * 50, trainer)
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # <s>, </s> by name
    for text in ["hello", " hello", "hello world", "\nhello", "", "\ufb01ne \u2460", "  x"]:
        assert tok.encode(text, add_bos=False) == tk.encode(text, add_special_tokens=False).ids
