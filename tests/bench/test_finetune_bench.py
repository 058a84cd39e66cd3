"""bench/finetune.py runs the real recipe end to end on CPU (tiny shape) and prints one result
line per profile; the packed profile counts real tokens only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("profile", ["lean", "packed"])
def test_finetune_bench_tiny(tmp_path, profile):
    env = {"TUNELAB_BENCH_CACHE": str(tmp_path), "PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "finetune.py"), "--shape", "tiny", "--steps", "2",
                           "--warmup", "1", "--profile", profile], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert row["profile"] == f"recipe_{profile}" and row["tokens_per_s"] > 0
    assert {"commit", "device", "config", "peak_gib", "loss"} <= set(row)
