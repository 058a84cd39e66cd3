"""Time the rank-r products of the LoRA functions, ``[N, r] @ [r, out]`` (N = 4096 tokens of the
8B step), with the right operand row-major or column-major: cuBLAS picks different kernels.

    python bench/low_rank_mm.py        (on the GPU machine; one JSON line per shape)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _profiled, device_name, emit  # noqa: E402


def _kernel_names(fn, device: torch.device) -> list[str]:
    """The GPU kernels one call of ``fn`` runs (to match against a step's breakdown)."""
    prof, _ = _profiled(fn, steps=1, device=device)
    return [e.name[:100] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    from triton.testing import do_bench

    dev, n = torch.device("cuda"), 4096
    for r, out in ((16, 4096), (32, 4096), (48, 4096), (16, 14336), (16, 1024)):
        left = torch.randn(n, r, device=dev, dtype=torch.bfloat16)
        right = torch.randn(r, out, device=dev, dtype=torch.bfloat16)
        col = right.t().contiguous().t()
        times, kernels = {}, {}
        for name, b in (("row_major", right), ("column_major", col)):
            times[f"{name}_us"] = round(do_bench(lambda b=b: torch.mm(left, b)) * 1000, 1)
            kernels[name] = _kernel_names(lambda b=b: torch.mm(left, b), dev)
        gb = n * out * 2 / 1e9
        emit(dict(device=device_name(dev), bench="low_rank_mm", shape=f"{n}x{r} @ {r}x{out}", **times,
                  write_gb=round(gb, 4), kernels=kernels))


if __name__ == "__main__":
    main()
