"""Fixtures for the GGUF export tests: tiny checkpoints carrying either kind of tokenizer.

* ``tiktoken``: tunelab's tiny Llama-3-style BPE file (data/tiny/tokenizer.model, 506 ranks
  + 256 special tokens = 762 ids).
* ``sentencepiece``: a Llama-2-style BPE sentencepiece model (byte fallback, <unk>/<s>/</s> at
  0/1/2, digits split, no whitespace normalisation) trained here on the tiny training text.
* ``hf_json``: a Llama-3-style HF ``tokenizer.json`` (Split regex + ByteLevel, specials first)
  trained here with the ``tokenizers`` library, as fine-tuned Llama 3 checkpoints ship it.
* ``qwen_json``: the same with Qwen's split regex (single digits) and ChatML specials.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"
TOKENIZER_KINDS = ("tiktoken", "sentencepiece")


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory) -> dict[str, Path]:
    """``{"tiktoken": path, "sentencepiece": path}`` of the two tiny tokenizer models."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp_tokenizer")
    text = folder / "corpus.txt"
    with open(TINY / "train.jsonl", encoding="utf-8") as f, open(text, "w", encoding="utf-8") as out:
        for line in f:
            record = json.loads(line)
            out.write(" ".join(v for v in record.values() if v) + "\n")
    prefix = folder / "sp"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return {
        "tiktoken": TINY / "tokenizer.model",
        "sentencepiece": prefix.with_suffix(".model"),
        "hf_json": _train_hf_json(text, folder / "tokenizer.json"),
        "qwen_json": _train_hf_json(text, folder / "qwen" / "tokenizer.json", qwen=True),
    }


def _train_hf_json(corpus: Path, out: Path, qwen: bool = False) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from tunelab.data.tokenizers import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN

    tk = Tokenizer(models.BPE(ignore_merges=True))  # as Llama 3's tokenizer.json
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN if qwen else LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen else
                ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tk.train([str(corpus)], trainer)
    tk.save(str(out))
    return out


@pytest.fixture(scope="session")
def export_checkpoint(make_hf_checkpoint, tokenizer_files, tmp_path_factory):
    """Factory: ``export_checkpoint(kind, tokenizer="tiktoken", seed=0, **overrides) -> Path``.

    A copy of ``make_hf_checkpoint(kind, seed, **overrides)`` with the tokenizer as
    ``tokenizer.model`` (cached per argument set; treat as read-only).
    """
    cache: dict = {}

    def make(kind: str = "llama3", tokenizer: str = "tiktoken", seed: int = 0, **overrides) -> Path:
        key = (kind, tokenizer, seed, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            src = make_hf_checkpoint(kind, seed=seed, **overrides)
            out = tmp_path_factory.mktemp(f"export_{kind}_{tokenizer}") / "ckpt"
            shutil.copytree(src, out)
            src_tok = tokenizer_files[tokenizer]
            shutil.copyfile(src_tok, out / ("tokenizer.json" if src_tok.suffix == ".json" else "tokenizer.model"))
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def random_text():
    """``random_text(seed, n_words=60) -> str``: see ``_random_text``."""
    return _random_text


def _random_text(seed: int, n_words: int = 60) -> str:
    """Mixed text for tokenizer round trips: words from the tiny corpus and made-up ones,
    digits, punctuation, repeated spaces, newlines, accents and a CJK character (byte fallback)."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "Reverse", "word", "12", "7", "3405", "don't", "it's", "hello",
             "wörld", "naïve", "日本", "x_y", "CamelCase", "  ", "\n", "\t", "!!", "?", "(a,b)",
             "'quoted'", "-", "UPPER", "lower", "The", "answer", "is", "42."]
    parts = []
    for _ in range(n_words):
        if rng.random() < 0.2:
            parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))))
        else:
            parts.append(rng.choice(words))
    return " ".join(parts)
