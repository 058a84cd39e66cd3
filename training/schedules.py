"""Learning-rate schedules: linear warmup, then cosine / linear / constant.

Built as a ``torch.optim.lr_scheduler.LambdaLR`` so ``state_dict()`` / ``load_state_dict()``
round-trip through JSON (the lambda is a plain closure, so LambdaLR saves no state for it:
the shape of the schedule always comes from the config, only the position is restored).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from tunelab.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0
) -> float:
    """The factor applied to the base lr before optimizer step ``step`` (0-based).

    Args:
        step: optimizer steps taken so far.
        warmup_steps: steps of linear warmup from lr/warmup_steps up to lr (0 = none).
        total_steps: total optimizer steps of the run; decay reaches its end there.
        schedule: ``cosine`` (half cosine down to ``min_lr_ratio``), ``linear`` (straight line
            down to ``min_lr_ratio``) or ``constant``.
        min_lr_ratio: final lr as a fraction of the base lr for cosine/linear.
    """
    if step < warmup_steps:
        # (step + 1) so the very first step already trains (lr/warmup, not 0).
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ConfigError(f"lr_scheduler.schedule: unknown {schedule!r}; use one of {', '.join(SCHEDULES)}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR following :func:`lr_multiplier`; call ``.step()`` after each optimizer step.

    Args:
        optimizer: the optimizer whose param groups' lr is scaled.
        warmup_steps, total_steps, schedule, min_lr_ratio: see :func:`lr_multiplier`.

    Raises:
        ConfigError: unknown schedule or negative warmup.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr_scheduler.schedule: unknown {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return lr_multiplier(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            schedule=schedule,
            min_lr_ratio=min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
