"""Gated MLP: SwiGLU (Llama, Qwen, Mistral) or GeGLU with tanh GELU (Gemma)."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.kernels import gated_act
from tunelab.modules.projections import mlp, project, project_onto
from tunelab.modules.recompute import is_recomputing


class FeedForward(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with ``act`` silu or tanh-GELU.

    The three projections are plain ``nn.Linear(bias=False)`` attributes so LoRA can replace
    them by leaf name.

    Args:
        dim: model width.
        hidden_dim: inner width (Llama's ``intermediate_size``).
        act: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (Gemma's ``gelu_pytorch_tanh``).
        fused_gate_up: one ``gate_up_proj`` ([gate; up] rows, Phi-3) instead of two.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "silu", fused_gate_up: bool = False) -> None:
        super().__init__()
        self.act = act
        self.fused_gate_up = fused_gate_up
        if fused_gate_up:
            self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)
        else:
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
            self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim] -> [..., dim]; ``residual`` [..., dim], if given, is added to the result
        (inside the down projection's GEMMs where it is a fused LoRA layer)."""
        # checkpointing's rerun only refills saved tensors: nothing reads the output there
        unread = is_recomputing()
        if self.act == "silu" and not self.fused_gate_up:  # the fused LoRA MLP kernels are SwiGLU's
            out = mlp(x, self.gate_proj, self.up_proj, self.down_proj, unread=unread, residual=residual)
            if out is not None:  # a fused node (LoRA on all three)
                return out
        if self.fused_gate_up:
            (gate_up,) = project(x, self.gate_up_proj)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = project(x, self.gate_proj, self.up_proj)  # one LoRA node when both are adapted
        hidden = gated_act(gate, up, self.act)  # act(gate) * up
        if residual is not None and not unread:
            return project_onto(hidden, self.down_proj, residual)
        (out,) = project(hidden, self.down_proj, unread=unread)
        return out if residual is None else residual + out
