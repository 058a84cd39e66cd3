"""NF4 experts for QLoRA on mixture-of-experts models: a stacked expert weight [E, out, in]
held as one ``NF4Weight`` per expert.

The experts' forward (``tunelab.modules.moe.Experts``) asks the weight for ``linear(h, e)``:
expert e's tokens times its weight through ``nf4_linear``, which dequantizes that one expert
(into the shared buffer) and dequantizes it again in the backward, so no expert's dense weight
outlives its call and a layer's experts are never all dense at once. ``state_dict()`` presents
the dense stacked tensor under the weight's own name, so merged exports write an ordinary
checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.modules.nf4.linear import nf4_linear
from tunelab.modules.nf4.weight import NF4Weight

__all__ = ["NF4ExpertWeights"]


class NF4ExpertWeights(nn.Module):
    """One NF4 weight per expert, standing in for a stacked [E, out, in] expert Parameter.

    Args:
        weights: the experts' ``NF4Weight`` [out, in] each, in expert order.
        transposed: the stack it stands for is input-major, [E, in, out] (gpt-oss's layout,
            ``modules.moe.BiasedExperts``): each expert is still quantized as [out, in], and
            ``shape`` and the dense view (state dict, :meth:`dequantize`) are [E, in, out].
    """

    def __init__(self, weights: list[NF4Weight], transposed: bool = False) -> None:
        super().__init__()
        if not weights or len({tuple(w.shape) for w in weights}) != 1:
            raise ValueError("NF4ExpertWeights needs one or more NF4 weights of one shape")
        self.experts = nn.ModuleList(weights)
        self.transposed = transposed
        out_dim, in_dim = weights[0].shape
        self.shape = torch.Size((len(weights), in_dim, out_dim) if transposed else (len(weights), out_dim, in_dim))
        self.register_state_dict_post_hook(_dense_view)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights dequantize to (the original one)."""
        return self.experts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.experts[0].device

    def dim(self) -> int:
        return 3

    def linear(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """``h @ W_e^T`` for expert e: h [n, in] -> [n, out], no gradient for W."""
        return nf4_linear(h, self.experts[e])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense stack, [E, out, in] (``transposed``: [E, in, out]); for exports, never in
        the training path."""
        dense = torch.stack([w.dequantize(dtype) for w in self.experts])
        return dense.transpose(1, 2).contiguous() if self.transposed else dense

    def extra_repr(self) -> str:
        return f"experts={self.shape[0]}, shape={list(self.shape[1:])}, nf4" + (", transposed" if self.transposed else "")


def _dense_view(module: NF4ExpertWeights, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict[prefix.removesuffix(".")] = module.dequantize()
