"""LR schedules, metrics.jsonl logger and device/dtype helpers."""

import json
import math

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.training.metrics import MetricsLogger, read_metrics
from tunelab.training.schedules import build_lr_scheduler, lr_multiplier
from tunelab.training.utils import cuda_only_settings_notice, resolve_device, resolve_dtype


def _lrs(schedule, warmup, total, min_lr_ratio=0.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(opt, warmup_steps=warmup, total_steps=total, schedule=schedule, min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_zero():
    lrs = _lrs("cosine", warmup=4, total=20)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay after warmup
    assert lr_multiplier(20, warmup_steps=4, total_steps=20, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    # halfway through the decay the cosine is at 0.5
    assert lr_multiplier(12, warmup_steps=4, total_steps=20, schedule="cosine") == pytest.approx(0.5)


def test_min_ratio_linear_constant():
    assert lr_multiplier(100, warmup_steps=0, total_steps=100, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, warmup_steps=0, total_steps=100, schedule="linear") == pytest.approx(0.5)
    assert _lrs("constant", warmup=2, total=6) == pytest.approx([0.5, 1, 1, 1, 1, 1])


def test_scheduler_state_dict_is_json_and_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    a = build_lr_scheduler(opt, warmup_steps=3, total_steps=10, schedule="cosine")
    for _ in range(5):
        opt.step()
        a.step()
    state = json.loads(json.dumps(a.state_dict()))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    b = build_lr_scheduler(opt2, warmup_steps=3, total_steps=10, schedule="cosine")
    b.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # the optimizer state carries lr
    for _ in range(5):
        opt.step(); a.step(); opt2.step(); b.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_bad_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="cosine"):
        build_lr_scheduler(opt, warmup_steps=0, total_steps=10, schedule="cosin")


def test_metrics_logger_rows_and_truncate(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 5):
        log.log({"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-3})
    log.log({"step": 4, "epoch": 0, "eval_loss": float("nan")})
    log.truncate_after(2)
    log.log({"step": 3, "epoch": 0, "loss": 9.0})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] == 9.0
    # nan is written as null so every line is valid JSON
    log = MetricsLogger(tmp_path, "m2.jsonl")
    log.log({"step": 1, "loss": math.inf})
    log.close()
    assert read_metrics(tmp_path / "m2.jsonl") == [{"step": 1, "loss": None}]


def test_device_dtype_notice(capsys):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("fp16", torch.device("cpu"))
    flags = cuda_only_settings_notice(torch.device("cpu"), compile=True, other=False)
    assert flags == {"compile": False, "other": False}
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["notice: compile switched off on cpu (needs CUDA)"]


def test_throughput_counts_training_steps_only(monkeypatch):
    """tokens/s covers the steps' own time: an eval or a save between two steps (resume()) is
    left out, counts carry over a pause, and rate() starts a new window."""
    from types import SimpleNamespace

    import tunelab.training.metrics as metrics_mod

    clock = iter([0.0, 2.0, 3.0, 103.0, 105.0, 106.0, 110.0])  # perf_counter readings in call order
    monkeypatch.setattr(metrics_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = metrics_mod.Throughput()  # t=0
    meter.step(100)  # t=2: 2 s
    meter.step(100)  # t=3: 1 s
    meter.resume()  # t=103: a 100 s eval is not training
    meter.step(200)  # t=105: 2 s
    assert meter.rate() == 400 / 5
    meter.step(50)  # t=106: 1 s
    meter.resume()  # t=110
    assert meter.rate() == 50 / 1
    assert meter.rate() == 0.0  # nothing counted since


def test_a_line_cut_by_a_kill_is_skipped_and_dropped_on_resume(tmp_path):
    """A run killed mid-write leaves a cut last line: reading skips it, and the resume's
    truncation writes a clean file (by rename: no temporary left behind)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    logger = MetricsLogger(tmp_path)
    logger.truncate_after(1)
    logger.log({"step": 2, "loss": 1.4})
    logger.close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.4}]
    assert path.read_text().count("\n") == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
