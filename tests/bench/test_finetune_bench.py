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


def test_long_context_profile_tiny(tmp_path):
    """The long-context config through the bench at a given --seq/--batch: one line with the
    issue's fields (system, workload, run_id, shipped, max_seq_len); the MLP tiled here (an
    --extra override, so the line is not 'shipped')."""
    env = {"TUNELAB_BENCH_CACHE": str(tmp_path), "PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "finetune.py"), "--shape", "tiny", "--steps", "1",
                           "--warmup", "1", "--profile", "long", "--seq", "96", "--workload", "qlora_1x96",
                           "--run-id", "r1", "--extra", "mlp_tile_tokens=32"], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert row["system"] == "tunelab" and row["workload"] == "qlora_1x96" and row["run_id"] == "r1"
    assert row["max_seq_len"] == 96 and row["shipped"] is False and row["tokens_per_s"] > 0
    assert "llama3_1/8B_qlora_long_context bs1 seq96" in row["config"]


def test_max_seq_search_doubles_then_bisects(monkeypatch, capsys):
    """The search of bench/long_context.py: doubling from --start until a run fails, then
    bisecting to --step; the max_seq line names the longest length that trained."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("long_context", ROOT / "bench" / "long_context.py")
    long_context = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(long_context)
    tried = []

    def fake_run(seq, args, run_id, steps, warmup):
        tried.append(seq)
        return {"tokens_per_s": 1.0, "peak_gib": 1.0, "workload": "x"} if seq <= 700_000 else None

    monkeypatch.setattr(long_context, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["long_context.py", "--lengths", "--start", "262144", "--step", "16384"])
    monkeypatch.setenv("BENCH_OUT", "")
    long_context.main()
    assert tried[:3] == [262144, 524288, 1048576]
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["workload"] == "max_seq" and 700_000 - 16384 < row["max_seq_len"] <= 700_000
    assert row["first_failed"] > 700_000 and row["max_seq_len"] % 16384 == 0
