"""Helpers for the FSDP2 tests: torchrun subprocesses on CPU (gloo), tiny data."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import tunelab

REPO = Path(tunelab.__file__).resolve().parent
TINY_TOKENIZER = REPO / "data" / "tiny" / "tokenizer.model"
DIST_RECIPE = REPO / "recipes" / "lora_finetune_distributed.py"
DPO_RECIPE = REPO / "recipes" / "lora_dpo_distributed.py"
WORDS = "apple river stone window garden planet tiger castle forest candle summer rocket".split()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """builtin:tiny must never write into the real ~/.cache during tests."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path_factory.getbasetemp() / "tunelab_cache"))


def alpaca_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """Short alpaca records of unequal lengths (so padding and the loss normalisation matter)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(1, 6))
        if i % 2:
            rows.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
        else:
            rows.append({"instruction": "Uppercase it.", "input": " ".join(words), "output": " ".join(words).upper()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_jsonl(path: Path, n: int, start: int = 0) -> Path:
    """n of the packaged tiny preference pairs (both record shapes occur), from line ``start``."""
    lines = (REPO / "data" / "tiny" / "preferences.jsonl").read_text().splitlines()[start : start + n]
    path.write_text("\n".join(lines) + "\n")
    return path


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 90, extra_env: dict | None = None,
             via_tune: bool = False):
    """Run ``script`` under torchrun on this machine (free port via --standalone); returns the
    CompletedProcess (stdout and stderr captured as text). ``via_tune`` launches through
    ``tune run --standalone --nproc_per_node N <recipe name>`` instead (which execs torchrun)."""
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    launcher = [sys.executable, "-m", "tunelab.cli.main", "run"] if via_tune else [
        sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def resume_on_one_rank(dist_out: Path, resumed_out: Path, script: str | Path, *args: str) -> Path:
    """Copy a finished 2-rank run to ``resumed_out`` without its final step_4, resume it with
    ``script`` on one rank (``args``: config and overrides), check it resumed; returns the folder."""
    shutil.copytree(dist_out, resumed_out)
    shutil.rmtree(resumed_out / "step_4")
    run = torchrun(1, script, *args, "resume=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout
    return resumed_out


@pytest.fixture
def dt():
    """The helpers above, as a fixture (test files cannot import conftest by name)."""
    return SimpleNamespace(alpaca_jsonl=alpaca_jsonl, pairs_jsonl=pairs_jsonl, torchrun=torchrun,
                           resume_on_one_rank=resume_on_one_rank, REPO=REPO,
                           TINY_TOKENIZER=TINY_TOKENIZER, DIST_RECIPE=DIST_RECIPE, DPO_RECIPE=DPO_RECIPE)
