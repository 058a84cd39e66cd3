"""TensorBoard / W&B loggers: rows go to the library's API with the right step and keys.

The real packages are optional extras (large), so when one is absent a stub module that
records calls stands in via sys.modules; with the real package the test writes real files.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from tunelab.errors import ConfigError
from tunelab.training.loggers import TensorBoardLogger, WandbLogger, replay_metrics, scalars_of

ROWS = [
    {"step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 900.0, "grad_norm": 0.5},
    {"step": 2, "epoch": 0, "loss": 2.0, "lr": 2e-4, "tokens_per_s": 950.0, "grad_norm": None,
     "rewards/accuracy": 0.75},
    {"step": 2, "epoch": 0, "eval_loss": 2.2},
]


def _run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


def _stub_tensorboard(monkeypatch, calls):
    stub = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, log_dir, **kw):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, global_step=None):
            calls.append((tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    stub.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", stub)


def test_scalars_of_keeps_finite_numbers():
    assert scalars_of({"step": 3, "loss": 1.0, "x": None, "flag": True, "name": "a", "bad": float("nan")}) == (
        3, {"loss": 1.0})


def test_tensorboard_logger(tmp_path, monkeypatch):
    calls = []
    if importlib.util.find_spec("tensorboard") is None:
        _stub_tensorboard(monkeypatch, calls)
    n = replay_metrics(_run_dir(tmp_path), TensorBoardLogger(tmp_path / "tb"))
    assert n == 3
    if calls:
        assert calls[0] == ("init", str(tmp_path / "tb")) and calls[-1] == ("close",)
        scalars = {(c[0], c[2]): c[1] for c in calls[1:-1]}
        assert scalars[("loss", 1)] == 2.5 and scalars[("eval_loss", 2)] == 2.2
        assert scalars[("rewards/accuracy", 2)] == 0.75 and ("grad_norm", 2) not in scalars
        assert ("epoch", 1) in scalars
    else:  # the real package wrote event files
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wandb_logger_offline(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        calls = []
        stub = types.ModuleType("wandb")

        class Run:
            def log(self, values, step=None):
                calls.append(("log", values, step))

            def finish(self):
                calls.append(("finish",))

        def init(**kw):
            calls.append(("init", kw))
            return Run()

        stub.init = init
        monkeypatch.setitem(sys.modules, "wandb", stub)
    else:
        calls = None
        monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="tunelab-test", name="tiny", config={"lr": 1e-4}, dir=tmp_path / "wb")
    for row in ROWS:
        logger.log(row)
    logger.close()
    if calls is not None:
        init = calls[0][1]
        assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "wb") and init["config"] == {"lr": 1e-4}
        logs = [c for c in calls if c[0] == "log"]
        assert [c[2] for c in logs] == [1, 2, 2]
        assert logs[0][1]["loss"] == 2.5 and logs[2][1] == {"epoch": 0.0, "eval_loss": 2.2}
        assert calls[-1] == ("finish",)
    else:
        assert list((tmp_path / "wb").rglob("*.wandb"))  # an offline run on disk


def test_missing_packages_say_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"tunelab\[wandb\]"):
        WandbLogger(dir=tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"tunelab\[tensorboard\]"):
        TensorBoardLogger(tmp_path)
    with pytest.raises(ConfigError, match="metrics.jsonl not found"):
        replay_metrics(tmp_path)


def test_recipe_sends_rows_to_config_metric_loggers(tmp_path, monkeypatch):
    """`metric_loggers` in a config: the recipe logs every metrics.jsonl row to them too."""
    from tunelab.recipes import lora_finetune_single_device as recipe

    calls = []
    _stub_tensorboard(monkeypatch, calls)  # the same calls whether or not tensorboard is installed
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    node = "{_component_: tunelab.training.loggers.TensorBoardLogger, log_dir: " + str(tmp_path / "tb") + "}"
    recipe.main(["--config", "tiny/lora", f"output_dir={out}", "max_steps=2", "log_every_n_steps=1",
                 "save_merged=never", "validation=null", f"metric_loggers=[{node}]"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {(c[0], c[2]): c[1] for c in calls if len(c) == 3}
    assert calls[0] == ("init", str(tmp_path / "tb")) and calls[-1] == ("close",)
    for row in rows:
        assert logged[("loss", row["step"])] == pytest.approx(row["loss"])


def test_bad_metric_logger_fails_before_work(tmp_path, monkeypatch):
    from tunelab.recipes import lora_finetune_single_device as recipe

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    node = "{_component_: tunelab.training.loggers.TensorBoardLogger, logdir: x}"
    with pytest.raises(ConfigError, match=r"metric_loggers\[0\].*log_dir"):
        recipe.main(["--config", "tiny/lora", f"output_dir={tmp_path / 'run'}", f"metric_loggers=[{node}]"])
    assert not (tmp_path / "cache").exists()  # nothing was built (the tiny checkpoint included)


def test_tune_validate_checks_metric_loggers():
    from tunelab.cli.validate import validate_config

    assert validate_config("tiny/lora", []) == []
    node = "{_component_: tunelab.training.loggers.TensorBoardLogger, logdir: x}"
    errors = validate_config("tiny/lora", [f"metric_loggers=[{node}]"])
    assert len(errors) == 1 and "metric_loggers[0]" in errors[0] and "log_dir" in errors[0]
