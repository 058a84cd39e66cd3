"""The process group of a torchrun job, and the few collectives the recipes use.

Every function here also works without a process group (one device, world size 1): ranks are
0 of 1, collectives return their input, ``say`` prints. A recipe written against these runs
unchanged on one device and on N (``tunelab.training.spine`` joins the group only for the
distributed recipes).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from tunelab.errors import ConfigError

__all__ = [
    "all_gather_stack",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_rank0",
    "destroy_distributed",
    "exit_finished_run",
    "init_distributed",
    "is_rank0",
    "name_failing_rank",
    "rank",
    "say",
    "world_size",
]


def init_distributed(device_name: str, timeout_s: float, recipe: str = "lora_finetune_distributed") -> torch.device:
    """Join the process group torchrun set up (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) and return this rank's device.

    NCCL on CUDA (each rank takes ``cuda:LOCAL_RANK``), gloo on CPU. A collective that waits
    longer than ``timeout_s`` raises instead of hanging (e.g. when another rank died).

    Args:
        device_name: ``auto`` | ``cpu`` | ``cuda`` (``cuda:N`` is refused: torchrun picks it).
        timeout_s: process-group timeout in seconds.
        recipe: the recipe's name, for the launch hint when torchrun did not start it.

    Raises:
        ConfigError: not started by torchrun, or a device that cannot be used.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"{recipe} must be launched by torchrun; use "
                          f"`tune run --nproc_per_node N {recipe} --config ...`")
    if device_name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {device_name!r} is not supported here; use auto, cpu or cuda "
                          "(torchrun gives each rank cuda:LOCAL_RANK)")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device: cuda but CUDA is not available here; use device=cpu or device=auto")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    return device


def destroy_distributed() -> None:
    """Free what still holds the process group, then destroy it (call once, at the end).

    FSDP modules and DTensors keep the group alive through reference cycles; left to the
    interpreter's shutdown, the group's C++ worker threads are torn down after Python is gone,
    which gloo can answer with an abort. Collecting them first ends them in order.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def exit_finished_run() -> NoReturn:
    """End a finished torchrun worker without the interpreter's shutdown (call last, on success).

    By then every file is written and closed and the process group destroyed. What remains is
    CPython finalizing C++ objects (gloo's transport threads, CUDA state), where c10d has been
    seen to abort a worker ("terminate called without an active exception") after a fully
    successful run, and torchrun then fails the whole job. ``os._exit`` skips that step, after
    flushing stdout and stderr.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective, fp64 so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape and dtype on all ranks) stacked on every rank:
    [world, *t.shape] (``t[None]`` without a process group)."""
    if not dist.is_initialized():
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def say(*args) -> None:
    """``print`` on rank 0 only (torchrun interleaves every rank's output)."""
    if is_rank0():
        print(*args, flush=True)


@contextmanager
def name_failing_rank() -> Iterator[None]:
    """Re-raise whatever the body raises after printing ``error: rank N failed: Type: message``
    to stderr: torchrun interleaves the ranks' output, so the line says which rank it was."""
    try:
        yield
    except BaseException as e:
        if world_size() > 1:
            print(f"error: rank {rank()} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise

