"""The tiny CPU-demo assets: they load, are correct, small, and regenerate byte-identically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.data import PackedDataset, instruct_dataset, load_tokenizer

from .tiny_tasks import solve

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"
ASSETS = ("train.jsonl", "validation.jsonl", "tokenizer.model")


def records(name):
    return [json.loads(line) for line in (TINY / name).read_text().splitlines()]


def test_sizes_and_answers():
    assert (TINY / "tokenizer.model").stat().st_size < 20_000
    assert sum((TINY / n).stat().st_size for n in ASSETS[:2]) < 1_000_000
    train, val = records("train.jsonl"), records("validation.jsonl")
    assert len(train) == 8000 and len(val) == 100
    for r in train + val:
        assert set(r) == {"instruction", "input", "output"} and r["input"] == ""
        assert r["output"] == solve(r["instruction"]), r
    seen = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in seen for r in val)


def test_tokenizer_and_dataset_load():
    tok = load_tokenizer(TINY / "tokenizer.model")
    assert tok.vocab_size == 506 + 256
    assert tok.special_id("<|eot_id|>") in tok.stop_tokens
    train = instruct_dataset(tok, source=TINY / "train.jsonl", max_seq_len=64)
    val = instruct_dataset(tok, source=str(TINY / "validation.jsonl"), max_seq_len=64)
    assert (len(train), train.num_skipped) == (8000, 0)
    assert (len(val), val.num_skipped) == (100, 0)
    lens = train.seq_lens()
    assert max(lens) < 64  # nothing was truncated
    packed = PackedDataset(train, max_seq_len=256)
    assert packed.packing_efficiency > 0.9
    # The tokenizer round-trips the data (all merges are consistent).
    for r in records("validation.jsonl")[:20]:
        for text in r.values():
            assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_make_assets_is_deterministic(tmp_path):
    script = TINY / "make_assets.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for name in ASSETS:
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name


@pytest.mark.parametrize("name", ASSETS)
def test_assets_are_plain_ascii_lines(name):
    data = (TINY / name).read_bytes()
    assert data.isascii() and data.endswith(b"\n") and b"\r" not in data
