"""Helpers for running recipes in-process on tiny checkpoints.

The HF checkpoints from ``make_hf_checkpoint`` have vocab 1024 and no tokenizer, so the tests
pass the packaged tiny tokenizer (762 ids) with ``tokenizer=...``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

import tunelab

REPO = Path(tunelab.__file__).resolve().parent
TINY_TOKENIZER = REPO / "data" / "tiny" / "tokenizer.model"
LORA_RECIPE = REPO / "recipes" / "lora_finetune_single_device.py"
GENERATE_RECIPE = REPO / "recipes" / "generate.py"

WORDS = "apple river stone window garden planet tiger castle forest candle summer rocket".split()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """builtin:tiny must never write into the real ~/.cache during tests."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path_factory.getbasetemp() / "tunelab_cache"))


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """Short alpaca records of unequal lengths (so padding and normalisation matter)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(1, 6))
        kind = i % 3
        if kind == 0:
            rows.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
        elif kind == 1:
            rows.append({"instruction": f"Repeat {words[0]} twice.", "input": "", "output": f"{words[0]} {words[0]}"})
        else:
            rows.append({"instruction": "Uppercase it.", "input": " ".join(words), "output": " ".join(words).upper()})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def small_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))


def lora_argv(ckpt, out, data, *extra: str) -> list[str]:
    """tiny/lora retargeted at a test checkpoint; small and quick."""
    return [
        "--config", "tiny/lora",
        f"checkpoint_dir={ckpt}",
        f"tokenizer={TINY_TOKENIZER}",
        f"output_dir={out}",
        f"dataset.source={data}",
        "validation=null",
        "max_seq_len=64",
        "batch_size=4",
        "log_every_n_steps=1",
        "eval_every_n_steps=null",
        "lr_scheduler.warmup_steps=1",
        *extra,
    ]


def run_lora(argv: list[str]) -> list[dict]:
    """Run the LoRA recipe's main in-process; returns the metrics.jsonl rows."""
    from tunelab.recipes import lora_finetune_single_device as recipe
    from tunelab.training.metrics import read_metrics

    recipe.main(argv)
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
    return read_metrics(out / "metrics.jsonl")


@pytest.fixture
def rt():
    """The helpers above, as a fixture (test files cannot import conftest by name)."""
    return SimpleNamespace(
        alpaca_rows=alpaca_rows, write_jsonl=write_jsonl, lora_argv=lora_argv, run_lora=run_lora,
        TINY_TOKENIZER=TINY_TOKENIZER, LORA_RECIPE=LORA_RECIPE, GENERATE_RECIPE=GENERATE_RECIPE, REPO=REPO,
    )
