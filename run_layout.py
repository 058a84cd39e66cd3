"""The layout of a training run's output folder, owned here and nowhere else.

::

    output_dir/config.yaml            the config as given
    output_dir/metrics.jsonl          one JSON object per logged step
    output_dir/step_N/adapter/        PEFT adapter
    output_dir/step_N/merged/         HF folder with the adapters merged in (per save_merged)
    output_dir/step_N/state/          what resume needs (tunelab.training.checkpointing)
    output_dir/step_N/COMPLETE        written last: a step folder without it is not trusted
    output_dir/.lock                  the run writing the folder: pid, host, process start

A leaf module (standard library only): ``tunelab.training.checkpointing`` writes the layout,
``tunelab.models.checkpoint`` recognises a run folder passed where a model was expected, and
the board lists checkpoints and tells a running run, all through these functions.

One run owns an output folder at a time (:func:`take_lock`): two runs writing one folder
would interleave their metrics and delete each other's temporary checkpoint folders.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["COMPLETE", "LOCK", "MERGED", "complete_steps", "lock_holder", "merged_models", "release_lock", "step_dir",
           "step_dirs", "take_lock", "write_atomic"]

COMPLETE = "COMPLETE"
LOCK = ".lock"
MERGED = "merged"
_STEP_RE = re.compile(r"^step_(\d+)$")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file and a rename: a kill leaves the
    old file or the new one, never a cut one (markers, the lock, metrics.jsonl)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


# ------------------------------------------------------------------------------------ the lock
def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None if it is gone. A
    pid is reused after its process ends; (pid, start) names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def lock_holder(output_dir: str | Path) -> dict | None:
    """The live run holding ``output_dir``'s lock (``{"pid", "host", "start"}``), None when
    there is no lock or its process is gone. A lock taken on another host counts as live: its
    process cannot be looked up from here."""
    try:
        owner = json.loads((Path(output_dir) / LOCK).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return owner
    start = _process_start(pid)
    return owner if start is not None and start == owner.get("start") else None


def take_lock(output_dir: str | Path) -> None:
    """Make this process the owner of ``output_dir`` (``.lock``, released by
    :func:`release_lock`). A lock whose process is gone (a run killed with kill -9) is taken
    over with a notice.

    Raises:
        ConfigError: another live run holds the folder.
    """
    path = Path(output_dir) / LOCK
    mine = json.dumps(_me())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        owner = lock_holder(output_dir)
        if owner is not None and owner.get("pid") != os.getpid():
            raise ConfigError(f"output_dir {output_dir} is in use by the run with pid {owner['pid']} on "
                              f"{owner['host']}; wait for it or pick another output_dir (delete {path} only "
                              "if that run is gone)") from None
        print(f"notice: taking over the lock of a run that is gone ({path})", flush=True)
        write_atomic(path, mine)
        return
    with os.fdopen(fd, "w") as f:
        f.write(mine)


def release_lock(output_dir: str | Path) -> None:
    """Drop ``output_dir``'s lock if this process holds it."""
    path = Path(output_dir) / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
