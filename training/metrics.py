"""Metric logging: ``output_dir/metrics.jsonl`` (one JSON object per logged step) + a progress bar.

Rows look like ``{"step": 3, "epoch": 0, "loss": 2.31, "lr": 1e-4, "tokens_per_s": 812.5,
"grad_norm": 0.41, "peak_mem_gib": 3.2}`` (peak_mem_gib only on cuda); evaluation adds rows
``{"step": 10, "epoch": 0, "eval_loss": 2.05}``. Each line is flushed as it is written, so a
killed run keeps every row it logged.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from tunelab.run_layout import write_atomic
from tunelab.training.process_group import is_rank0

SMOOTHING = 0.5  # weight of the previous console loss in the moving average (per logged step)


class Throughput:
    """Tokens per second over training steps only: evaluation and checkpoint saves between
    steps are not counted as training time.

    The clock runs from one ``step(tokens)`` to the next; ``resume()`` restarts it after a pause
    (eval, save) without dropping what was counted, and ``rate()`` reports the tokens per second
    since the previous ``rate()`` and starts a new window.
    """

    def __init__(self) -> None:
        self._tokens, self._seconds = 0, 0.0
        self._since = time.perf_counter()

    def step(self, tokens: int) -> None:
        """Count one finished training step of ``tokens`` tokens."""
        now = time.perf_counter()
        self._seconds += now - self._since
        self._since = now
        self._tokens += tokens

    def resume(self) -> None:
        """After a pause: the time since the last step is not training time."""
        self._since = time.perf_counter()

    def rate(self) -> float:
        """Tokens per second of the steps counted since the last call (then reset)."""
        value = self._tokens / max(self._seconds, 1e-9)
        self._tokens, self._seconds = 0, 0.0
        return value


class MetricsLogger:
    """Appends one JSON object per call to ``output_dir/metrics.jsonl`` and hands the same row
    to any extra loggers (``tunelab.training.loggers``: TensorBoard, W&B).

    Args:
        output_dir: the run folder (created if missing).
        filename: file name inside output_dir.
        extra_loggers: objects with ``log(row)`` and ``close()`` (a config's ``metric_loggers``).
    """

    def __init__(self, output_dir: str | Path, filename: str = "metrics.jsonl", extra_loggers: Sequence[Any] = ()):
        self.path = Path(output_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self.extra_loggers = list(extra_loggers)

    def truncate_after(self, step: int) -> None:
        """Drop rows with ``step > step`` (rows of a crashed run past the checkpoint we resume)
        and lines a kill cut short. The kept rows go to a new file renamed over the old one, so
        a kill during this leaves the old file or the new one, never a cut one."""
        self._file.close()
        rows = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        """Write one row; floats that are not finite are written as null (JSON has no nan)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        for logger in self.extra_loggers:
            logger.log(row)

    def close(self) -> None:
        self._file.close()
        for logger in self.extra_loggers:
            logger.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file (empty list if it does not exist). A line that is not a
    JSON object (the last line of a run killed mid-write) is skipped, not an error."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory in GiB since the start (None on cpu)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class ProgressDisplay:
    """A tqdm bar over optimizer steps showing loss / lr / tokens per second.

    Falls back to plain lines when stderr is not a terminal (CI logs stay readable).

    Args:
        total_steps: optimizer steps of the whole run.
        initial: steps already done (resume).
    """

    def __init__(self, total_steps: int, initial: int = 0):
        from tqdm import tqdm

        self._interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=initial, dynamic_ncols=True, disable=not self._interactive)
        self.total = total_steps

    def update(self, row: dict[str, Any]) -> None:
        text = format_row(row)
        if self._interactive:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(row["step"] - self._bar.n)
        else:
            print(f"step {row['step']}/{self.total} {text}", flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self._interactive:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._bar.close()


def format_row(row: dict[str, Any]) -> str:
    parts = []
    # rewards/* are the preference (DPO) recipes' metrics; keys a row lacks are skipped
    for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("rewards/accuracy", "{:.2f}"),
                     ("rewards/margins", "{:.3f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_s", "{:.0f}"), ("peak_mem_gib", "{:.2f}")):
        value = row.get(key)
        if value is not None:
            name = {"tokens_per_s": "tok/s", "peak_mem_gib": "mem_gib", "rewards/accuracy": "acc",
                    "rewards/margins": "margin"}.get(key, key)
            parts.append(f"{name}={fmt.format(value)}")
    return " ".join(parts)


class RunLog:
    """``metrics.jsonl`` (+ the config's ``metric_loggers``) and the progress bar, resuming at
    ``step`` (rows a killed run logged after it are dropped). Every rank calls the same methods;
    only rank 0 writes.

    Args:
        run: the run (output_dir, metric_loggers, device for the peak memory).
        step: the step training starts from.
        total_steps: for the progress bar.
    """

    def __init__(self, run, step: int, total_steps: int):
        self.device = run.device
        self.metrics = self.display = None
        self._smoothed = None  # the console's moving-average loss
        if is_rank0():
            from tunelab.training.loggers import build_metric_loggers

            loggers = build_metric_loggers(run.cfg.metric_loggers, run.cfg.allowed_components)
            self.metrics = MetricsLogger(run.output_dir, extra_loggers=loggers)
            self.metrics.truncate_after(step)
            self.display = ProgressDisplay(total_steps, initial=step)
            self.display.write("(console loss: a moving average over the logged steps; metrics.jsonl has each step's)")

    def step(self, row: dict) -> None:
        """A training step's row (``peak_mem_gib`` added on CUDA: rank 0's): as it is to the file,
        and to the console with ``loss`` as a moving average of the logged steps' losses (one
        step's loss is noisy: a few short rows; the file keeps each)."""
        if self.metrics is None:
            return
        if (mem := peak_memory_gib(self.device)) is not None:
            row["peak_mem_gib"] = mem
        self.metrics.log(row)
        shown = dict(row)
        if isinstance(loss := row.get("loss"), float) and math.isfinite(loss):
            self._smoothed = loss if self._smoothed is None else SMOOTHING * self._smoothed + (1 - SMOOTHING) * loss
            shown["loss"] = self._smoothed
        self.display.update(shown)

    def event(self, row: dict, line: str) -> None:
        """A row that is not a training step (evaluation): the file, and ``line`` printed."""
        if self.metrics is not None:
            self.metrics.log(row)
            self.display.write(line)

    def close(self) -> None:
        if self.metrics is not None:
            self.display.close()
            self.metrics.close()
