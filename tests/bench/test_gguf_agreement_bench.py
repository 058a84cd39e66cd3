"""bench/gguf_agreement.py runs end to end on CPU (one kind x one dtype, few tokens) and prints
one result line whose numbers are the ones it claims to measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if not os.environ.get("CI"):  # CI installs .[dev]: a missing llama.cpp there is a failure, not a skip
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")


def test_gguf_agreement_bench_smoke():
    env = {k: v for k, v in os.environ.items() if k != "BENCH_OUT"}  # never append to bench/results
    env["PYTHONSAFEPATH"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gguf_agreement.py"), "--kinds", "tiktoken",
                           "--dtypes", "q4_k_m", "--prompts", "1", "--agreement-tokens", "4", "--logit-tokens", "16"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert row["profile"] == "gguf_agreement" and row["device"] == "cpu"
    assert row["config"]["kind"] == "tiktoken" and row["config"]["dtype"] == "q4_k_m"
    assert {"commit", "date", "tokens_per_s", "peak_gib"} <= set(row)
    assert row["tokens_per_s"] is None and row["peak_gib"] is None
    # q4_k_m against tunelab on the file's own weights: only llama.cpp's 8-bit activation
    # rounding is left, ~1.5% of the logit scale (tests/export/test_llama_cpp.py bounds it at 5%);
    # a misread tensor would be off by the scale itself.
    assert row["logit_reference"] == "tunelab_on_file_weights"
    assert row["max_abs_logit_diff"] <= 5e-2 * row["max_abs_logit"]
    assert row["agreement_tokens"] == 4 and 0.0 <= row["greedy_agreement"] <= 1.0
    # Q4_K is 4.5 bits per weight, Q6_K 6.5625; the F32 norms add a little on a tiny model
    assert 4.5 < row["bits_per_weight"] < 6.6 and "Q4_K" in row["tensor_types"]
    assert row["export_s"] > 0 and row["file_bytes"] > 0
