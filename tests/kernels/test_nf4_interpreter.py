"""Run ``test_nf4_kernel.py`` on CPU through Triton's interpreter, in a subprocess.

Same reason as ``test_interpreter.py``: ``TRITON_INTERPRET=1`` must be set before the kernel is
defined, and this process imported ``tunelab.kernels`` long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunelab.kernels import HAS_TRITON

HERE = Path(__file__).parent


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the NF4 kernel tests already run in this process",
)
def test_nf4_kernel_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONSAFEPATH="1")
    cmd = [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-p", "no:warnings",
           str(HERE / "test_nf4_kernel.py")]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=HERE.parents[1])
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"interpreter run failed ({elapsed:.0f} s):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "Triton kernels run on CUDA" not in proc.stdout, proc.stdout[-3000:]  # really ran, not skipped
    assert "passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert elapsed < 60, f"interpreter NF4 kernel tests took {elapsed:.0f} s; keep the shapes small"
