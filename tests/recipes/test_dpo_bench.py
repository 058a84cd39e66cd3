"""bench/dpo_step.py runs on CPU at the tiny shape and prints one JSON line with its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dpo_step.py"


def test_dpo_bench_smoke():
    env = dict(os.environ, SHAPE="tiny", STEPS="1", WARMUP="1", PYTHONSAFEPATH="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert {"commit", "device", "profile", "tokens_per_s", "pairs_per_s", "peak_gib"} <= set(row)
    assert row["device"] == "cpu" and row["profile"] == "dpo_lean" and row["tokens_per_s"] > 0
    # 2 x (16 + 16) tokens per pair; both figures are rounded (0.1 tok/s, 0.001 pairs/s)
    assert row["tokens_per_s"] / row["pairs_per_s"] == pytest.approx(2 * 32, rel=0.02)
    assert abs(row["loss"] - 0.6931) < 0.05  # near log 2: the adapters start at zero
