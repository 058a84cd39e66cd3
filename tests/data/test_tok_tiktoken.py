"""Llama 3 tiktoken tokenizer: ids against a bare tiktoken.Encoding (the oracle), specials,
round trips, long inputs and the Llama 3 chat format. Everything is built in the test."""

from __future__ import annotations

import base64
import collections
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.tokenizers import (
    LLAMA3_SPECIAL_TOKENS,
    LLAMA3_SPLIT_PATTERN,
    Message,
    load_tokenizer,
)
from tunelab.data.tokenizers.tiktoken_bpe import _split_for_encode

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024 and we'll train 12345 models!\n"
    "Llama 3 uses a byte-level BPE; café, naïve, über, 日本語のテキスト, привет мир, 🙂🚀.\n"
    "    def f(x):\n        return x ** 2  # squares\n\n\tTabs\tand  double  spaces.\r\n"
) * 20


def train_byte_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    """Tiny tiktoken-style BPE trainer: 256 byte ranks, then the most frequent pair, repeatedly."""
    words = collections.Counter(regex.findall(LLAMA3_SPLIT_PATTERN, text))
    ranks = {bytes([i]): i for i in range(256)}
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        new = a + b
        ranks[new] = len(ranks)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return ranks


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return train_byte_bpe(CORPUS, 300)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, ranks) -> Path:
    path = tmp_path_factory.mktemp("llama3tok") / "tokenizer.model"
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def oracle(ranks) -> tiktoken.Encoding:
    base = len(ranks)
    return tiktoken.Encoding(
        name="oracle",
        pat_str=LLAMA3_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={n: base + i for i, n in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )


@pytest.fixture(scope="module")
def tok(model_file):
    return load_tokenizer(model_file)


TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "It's they're we've I'M",
    "1234567890 3.14159",
    "   leading and trailing   ",
    "\n\n\nnewlines\r\n\r\n",
    "tabs\t\tand\u00a0nbsp",
    "café 日本語 привет 🙂🚀👩‍👩‍👧",
    "def f(x):\n    return x ** 2\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken(tok, oracle, text):
    assert tok.encode(text, add_bos=False) == oracle.encode(text, disallowed_special=())
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_layout(tok, ranks):
    base = len(ranks)
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.vocab_size == base + 256
    assert tok.bos_id == base + 0
    assert tok.eos_id == base + 1
    assert tok.pad_id == base + 4  # <|finetune_right_pad_id|>
    assert tok.special_id("<|start_header_id|>") == base + 6
    assert tok.special_id("<|eot_id|>") == base + 9
    assert tok.stop_tokens == [base + 1, base + 9, base + 8]  # end_of_text, eot, eom
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>hi<|end_of_text|>"


def test_special_text_is_plain_text(tok):
    text = "a <|eot_id|> b <|begin_of_text|>"
    ids = tok.encode(text, add_bos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_long_inputs(tok, oracle):
    # ordinary long text: chunking at safe boundaries must not change a single id
    text = CORPUS * 150  # ~ 600k characters
    assert len(text) > 400_000
    assert tok.encode(text, add_bos=False) == oracle.encode(text, disallowed_special=())
    # pathological runs are cut (Meta's rule) and still round-trip
    for run in ["x" * 60_000, " " * 60_000, "ab" * 30_001 + " z"]:
        assert "".join(_split_for_encode(run)) == run
        assert tok.decode(tok.encode(run)) == run


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_roundtrip_hypothesis(tok, oracle, s):
    ids = tok.encode(s, add_bos=False)
    assert tok.decode(ids) == s
    assert ids == oracle.encode(s, disallowed_special=())


def _segments(tok, ids, mask):
    """Decode runs of trainable positions (mask False) for readable assertions."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if not m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        out.append(tok.decode(cur, skip_special_tokens=False))
    return out


def test_chat_format_and_masks(tok):
    msgs = [
        Message("system", "Be brief."),
        Message("user", "  Hi there  "),
        Message("assistant", "Hello!"),
        Message("user", "2+2?"),
        Message("assistant", "4"),
    ]
    ids, mask = tok.tokenize_messages(msgs)
    assert len(ids) == len(mask)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )
    assert mask[0] is True
    assert _segments(tok, ids, mask) == ["Hello!<|eot_id|>", "4<|eot_id|>"]
    # ids equal encoding the rendered string with specials allowed (what HF templates do)
    rendered = tok.decode(ids, skip_special_tokens=False)
    assert ids == tok._enc.encode(rendered, allowed_special="all")


def test_generation_prompt_and_overrides(tok):
    ids, mask = tok.tokenize_messages(
        [{"role": "user", "content": "Q"}], add_generation_prompt=True
    )
    assert tok.decode(ids, skip_special_tokens=False).endswith(
        "Q<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert all(mask)
    # train_on_input style: user explicitly unmasked (header included); assistant masked
    ids, mask = tok.tokenize_messages(
        [Message("user", "Q", masked=False), Message("assistant", "A", masked=True)]
    )
    assert _segments(tok, ids, mask) == [
        "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
    ]


def test_bad_role(tok):
    from tunelab.errors import DataError

    with pytest.raises(DataError, match="role"):
        tok.tokenize_messages([Message("narrator", "x")])


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
