"""Small helpers every recipe uses: device / dtype resolution, seeding, CUDA-only switches."""

from __future__ import annotations

import random

import torch

from tunelab.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``, ``cuda`` and ``cuda:N`` as given.

    Raises:
        ConfigError: cuda requested but not available, or an unknown device string.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``fp32`` | ``bf16`` | ``auto`` (bf16 on cuda, fp32 on cpu).

    bf16 on cpu is allowed (slow, but it is what the big configs say); fp32 is the CPU default.

    Raises:
        ConfigError: unknown name, or bf16 on a GPU without bf16 support.
    """
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ConfigError(f"dtype: unknown {name!r}; use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype: bf16 is not supported by this GPU; use dtype=fp32")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy (if installed) and torch (cpu + all cuda devices)."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every cuda device
    try:
        import numpy as np
    except ImportError:  # numpy is optional; nothing of ours uses it
        return
    np.random.seed(seed % 2**32)


def cuda_only_settings_notice(device: torch.device, *, announce: bool = True, **settings):
    """Switch off settings that need CUDA when running on cpu, with a one-line notice (and
    ``offload_activations`` where pinned host memory cannot be allocated).

    Example: ``flags = cuda_only_settings_notice(device, compile=cfg.compile)`` returns
    ``{"compile": False}`` on cpu and prints ``notice: compile switched off on cpu (needs CUDA)``.

    Args:
        device: the resolved device.
        announce: print the notice (False: decide only; a distributed run's other ranks).
        **settings: name -> requested value (on/off, or a mode such as ``"inputs"``).

    Returns:
        name -> effective value (False where switched off).
    """
    if device.type == "cuda":
        flags = dict(settings)
        if flags.get("offload_activations") and not _pinned_memory_works():
            if announce:
                print("notice: offload_activations switched off: pinned host memory cannot be allocated here "
                      "(raise the locked-memory limit, ulimit -l, to use it)", flush=True)
            flags["offload_activations"] = False
        return flags
    switched = [name for name, on in settings.items() if on]
    if switched and announce:
        print(f"notice: {', '.join(switched)} switched off on cpu (needs CUDA)", flush=True)
    return {name: False for name in settings}


def _pinned_memory_works() -> bool:
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError:
        return False
    return True


def num_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
