"""The NF4 bench scripts run end to end on CPU with tiny shapes and print one JSON line."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

import tunelab

BENCH = Path(tunelab.__file__).resolve().parent / "bench"


def _run(script: str, monkeypatch, capsys, **env) -> dict:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OUT", raising=False)
    runpy.run_path(str(BENCH / script), run_name="__main__")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_qlora_step_bench_tiny(monkeypatch, capsys):
    row = _run("qlora_step.py", monkeypatch, capsys, SHAPE="tiny", STEPS="1", WARMUP="0", SEQ="16")
    assert {"commit", "device", "profile", "config", "tokens_per_s", "peak_gib"} <= set(row)
    assert row["tokens_per_s"] > 0 and row["loss"] == pytest.approx(row["loss"])  # finite
    assert row["nf4_bytes_per_param"] <= 0.6  # tiny matrices: the fp32 scale and offset weigh a little more


def test_nf4_dequant_bench_tiny(monkeypatch, capsys):
    row = _run("nf4_dequant.py", monkeypatch, capsys, SHAPE="tiny", ITERS="1")
    assert {"commit", "device", "profile", "gb_per_s", "copy_gb_per_s", "fraction_of_copy"} <= set(row)
    assert set(row["per_shape"]) == {"square", "wide"}
