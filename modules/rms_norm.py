"""RMSNorm as in Llama: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.kernels import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``weight * x / sqrt(mean(x^2) + eps)``.

    The statistics are computed in fp32 whatever the input dtype (bf16 squares underflow and
    lose the mean), and the result is cast back to the input dtype before the scale, exactly
    like Hugging Face's ``LlamaRMSNorm`` so bf16 outputs match bit for bit.

    Args:
        dim: size of the last (normalised) dimension.
        eps: added to the mean square for numerical stability.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # Triton on CUDA, same math in PyTorch elsewhere

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
