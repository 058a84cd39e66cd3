"""The layout of a training run's output folder, owned here and nowhere else.

::

    output_dir/config.yaml            the config as given
    output_dir/metrics.jsonl          one JSON object per logged step
    output_dir/step_N/adapter/        PEFT adapter
    output_dir/step_N/merged/         HF folder with the adapters merged in (per save_merged)
    output_dir/step_N/state/          what resume needs (tunelab.training.checkpointing)
    output_dir/step_N/COMPLETE        written last: a step folder without it is not trusted

A leaf module (standard library only): ``tunelab.training.checkpointing`` writes the layout,
``tunelab.models.checkpoint`` recognises a run folder passed where a model was expected, and
the board lists checkpoints, all through these functions.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["COMPLETE", "MERGED", "complete_steps", "merged_models", "step_dir", "step_dirs"]

COMPLETE = "COMPLETE"
MERGED = "merged"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir(output_dir: str | Path, step: int) -> Path:
    """``output_dir/step_<step>``."""
    return Path(output_dir) / f"step_{step}"


def step_dirs(output_dir: str | Path) -> dict[int, Path]:
    """All ``step_N`` folders of a run (complete or not) by step; {} when there is no folder."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    found = {}
    for child in output_dir.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir():
            found[int(m.group(1))] = child
    return found


def complete_steps(output_dir: str | Path) -> list[int]:
    """Steps whose folder has the COMPLETE marker, ascending."""
    return sorted(s for s, d in step_dirs(output_dir).items() if (d / COMPLETE).is_file())


def merged_models(output_dir: str | Path) -> list[Path]:
    """The ``step_N/merged`` model folders (those with a config.json), oldest first."""
    return [d / MERGED for _, d in sorted(step_dirs(output_dir).items()) if (d / MERGED / "config.json").is_file()]
