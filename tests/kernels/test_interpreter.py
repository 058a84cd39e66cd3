"""Run the Triton kernel tests on CPU through Triton's interpreter, in a subprocess.

``TRITON_INTERPRET=1`` only takes effect for kernels defined after it is set, and this pytest
process imported ``tunelab.kernels`` during collection; so the kernel test files (which skip
in-process on a machine without CUDA, see conftest.py) are run again in a fresh process with
the interpreter on. Small shapes keep it to seconds.
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
FILES = ["test_rms_norm.py", "test_rope.py", "test_swiglu.py", "test_fused_ce.py", "test_model_kernels.py",
         "test_nf4_kernel.py", "test_lora_mlp.py"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the kernel tests already run in this process",
)
def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONSAFEPATH="1")
    cmd = [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-p", "no:warnings"]
    cmd += [str(HERE / f) for f in FILES]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=HERE.parents[1])
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"interpreter run failed ({elapsed:.0f} s):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    # The interpreter must actually have run them (the `device` fixture skips otherwise).
    assert "Triton kernels run on CUDA" not in proc.stdout, proc.stdout[-3000:]
