"""bench/loss_agreement.py runs on CPU (tiny shape, the kernels' references on both paths) and
prints one line with the fused / reference / fp32-truth losses and the bf16-noise verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_loss_agreement_bench_tiny():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_agreement.py"), "--shape", "tiny", "--seq", "32"],
                          capture_output=True, text=True, timeout=240,
                          env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin", "TUNELAB_COMMIT": "test",
                               # where tunelab is found through PYTHONPATH (the GPU machine), keep it
                               **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert row["profile"] == "loss_agreement" and row["ok"] is True
    assert set(row["rel_err"]) == {"fused_loss", "reference_loss", "fused_grads", "reference_grads"}
    assert abs(row["loss"]["truth"] - row["loss"]["reference"]) < 1e-2
