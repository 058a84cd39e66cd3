"""RMSNorm as in Llama (normalise in fp32, cast back, then scale) or as in Gemma (scale by
``1 + weight``, all in fp32)."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.kernels import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``weight * x / sqrt(mean(x^2) + eps)``.

    The statistics are computed in fp32 whatever the input dtype (bf16 squares underflow and
    lose the mean), and the result is cast back to the input dtype before the scale, exactly
    like Hugging Face's ``LlamaRMSNorm`` so bf16 outputs match bit for bit.

    With ``plus_one`` (Gemma's ``Gemma3RMSNorm``) the scale is ``1 + weight`` (weights start
    at 0), and the normalised row is multiplied in fp32 and rounded once, to the input dtype.

    Args:
        dim: size of the last (normalised) dimension.
        eps: added to the mean square for numerical stability.
        plus_one: Gemma's form.
    """

    def __init__(self, dim: int, eps: float = 1e-6, plus_one: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Triton on CUDA, the same math in PyTorch elsewhere
        return rms_norm(x, self.weight, self.eps, self.plus_one)

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.plus_one else nn.init.ones_)(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", plus_one" if self.plus_one else "")
