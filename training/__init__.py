"""Training utilities shared by every recipe: checkpoint/resume state, metrics, lr schedules,
device/dtype helpers, ``builtin:`` paths. Config parsing lives in ``tunelab.training.config``."""

from tunelab.training.builtin import resolve_builtin, tiny_checkpoint
from tunelab.training.checkpointing import (
    CheckpointManager,
    RankSampler,
    ResumableSampler,
    TrainingProgress,
    adapter_writer,
    load_state,
    merged_writer,
    save_state,
    state_writer,
)
from tunelab.training.metrics import MetricsLogger, ProgressDisplay, read_metrics
from tunelab.training.schedules import build_lr_scheduler, lr_multiplier
from tunelab.training.utils import cuda_only_settings_notice, resolve_device, resolve_dtype, seed_everything

__all__ = [
    "CheckpointManager",
    "MetricsLogger",
    "ProgressDisplay",
    "RankSampler",
    "ResumableSampler",
    "TrainingProgress",
    "adapter_writer",
    "build_lr_scheduler",
    "cuda_only_settings_notice",
    "load_state",
    "lr_multiplier",
    "merged_writer",
    "read_metrics",
    "resolve_builtin",
    "resolve_device",
    "resolve_dtype",
    "save_state",
    "seed_everything",
    "state_writer",
    "tiny_checkpoint",
]
