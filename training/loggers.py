"""Metric loggers beside ``metrics.jsonl``: TensorBoard and Weights & Biases.

``metrics.jsonl`` (``tunelab.training.metrics.MetricsLogger``) stays the one record every recipe
writes; these loggers send the same rows elsewhere. Each takes rows shaped like a metrics.jsonl
line (``{"step": 10, "loss": 2.3, "lr": 1e-4, ...}``; every other numeric key becomes a scalar
at that step) and imports its library only when built, so neither is a dependency:

    pip install 'tunelab[tensorboard]'   # TensorBoardLogger (torch.utils.tensorboard)
    pip install 'tunelab[wandb]'         # WandbLogger (offline by default: no network, no login)

Every training config has ``metric_loggers`` (a list of ``_component_`` nodes, ``[]`` by
default); the recipe builds them with :func:`build_metric_loggers` and logs every row to them::

    metric_loggers:
      - {_component_: tunelab.training.loggers.TensorBoardLogger, log_dir: /tmp/tunelab/tb}
      - {_component_: tunelab.training.loggers.WandbLogger, project: tunelab}

or replay a finished or running run's metrics::

    from tunelab.training.loggers import TensorBoardLogger, replay_metrics
    replay_metrics("/tmp/tunelab/tiny_lora", TensorBoardLogger("/tmp/tunelab/tiny_lora/tb"))
    # then: tensorboard --logdir /tmp/tunelab/tiny_lora/tb
    # W&B: WandbLogger(project="tunelab", dir=...) writes an offline run; `wandb sync DIR` uploads it
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

__all__ = ["TensorBoardLogger", "WandbLogger", "build_metric_loggers", "check_metric_loggers", "replay_metrics", "scalars_of"]


def scalars_of(row: Mapping[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {key: value}) for the numeric, finite values of a metrics row (``step`` excluded)."""
    step = row.get("step")
    values = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            values[key] = float(value)
    return (step if isinstance(step, int) else None), values


class TensorBoardLogger:
    """Writes each row's scalars as TensorBoard events (``torch.utils.tensorboard``).

    Args:
        log_dir: folder for the event files (``tensorboard --logdir`` it).
        **writer_kwargs: passed to ``SummaryWriter`` (e.g. ``flush_secs``).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path, **writer_kwargs: Any):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module raises ImportError when tensorboard is missing
            raise ConfigError("TensorBoardLogger needs tensorboard: pip install 'tunelab[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), **writer_kwargs)

    def log(self, row: Mapping[str, Any]) -> None:
        """Log one metrics row (its ``step`` is the x axis)."""
        step, values = scalars_of(row)
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbLogger:
    """Logs each row to a Weights & Biases run; offline by default (no network, no account).

    Args:
        project: W&B project name.
        name: run name (default: W&B's).
        config: the run's settings (e.g. ``config_to_dict(cfg)``), shown beside the curves.
        dir: folder for W&B's files (default: W&B's, ``./wandb``).
        mode: ``"offline"`` (files only; ``wandb sync`` uploads later), ``"online"`` or
            ``"disabled"``.
        **init_kwargs: passed to ``wandb.init``.

    Raises:
        ConfigError: the ``wandb`` package is not installed.
    """

    def __init__(self, project: str = "tunelab", *, name: str | None = None, config: Mapping[str, Any] | None = None,
                 dir: str | Path | None = None, mode: str = "offline", **init_kwargs: Any):
        try:
            import wandb
        except ImportError:
            raise ConfigError("WandbLogger needs wandb: pip install 'tunelab[wandb]'") from None
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project, name=name, config=dict(config or {}),
                               dir=None if dir is None else str(dir), mode=mode, **init_kwargs)

    def log(self, row: Mapping[str, Any]) -> None:
        """Log one metrics row at its ``step`` (eval rows share the step of their train row)."""
        step, values = scalars_of(row)
        if values:
            self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


def replay_metrics(output_dir: str | Path, *loggers: Any, close: bool = True) -> int:
    """Send every row of ``output_dir/metrics.jsonl`` to the loggers; returns the row count.

    Raises:
        ConfigError: no metrics.jsonl in output_dir.
    """
    from tunelab.training.metrics import read_metrics

    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass a run's output_dir")
    rows = read_metrics(path)
    for row in rows:
        for logger in loggers:
            logger.log(row)
    if close:
        for logger in loggers:
            logger.close()
    return len(rows)


def check_metric_loggers(nodes: list[Mapping[str, Any]], allowed: Sequence[str] = ()) -> None:
    """Check a config's ``metric_loggers`` list (``_component_`` nodes) without building any:
    every target imports and accepts its keys. Recipes call it before any work starts.
    ``allowed``: the config's ``allowed_components``.

    Raises:
        ConfigError: a node is not a ``_component_`` mapping, or its target or keys are wrong.
    """
    from tunelab.training.config import check_component

    for i, node in enumerate(nodes):
        if not isinstance(node, Mapping) or "_component_" not in node:
            raise ConfigError(f"metric_loggers[{i}] must be a mapping with _component_ (e.g. "
                              f"{{_component_: tunelab.training.loggers.TensorBoardLogger, log_dir: DIR}}), got {node!r}")
        check_component(node, f"metric_loggers[{i}]", allowed=allowed)


def build_metric_loggers(nodes: list[Mapping[str, Any]], allowed: Sequence[str] = ()) -> list[Any]:
    """Build a config's ``metric_loggers`` (checked first, see :func:`check_metric_loggers`)."""
    from tunelab.training.config import instantiate

    check_metric_loggers(nodes, allowed)
    return [instantiate(dict(node), allowed_components=allowed) for node in nodes]
