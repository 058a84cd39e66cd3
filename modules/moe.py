"""Mixture-of-experts feed-forward: a linear router picks ``top_k`` of ``n_experts`` experts
per token and mixes their outputs by the routing weights (Qwen3-MoE: :class:`MoE` over SwiGLU
:class:`Experts`; gpt-oss: :class:`BiasedMoE` over :class:`BiasedExperts`).

The experts' weights are stacked as transformers holds them in memory (``gate_up_proj``
[E, 2 * hidden, dim], gate rows then up rows; ``down_proj`` [E, dim, hidden]), the layout a
grouped GEMM takes and the one PEFT's expert LoRA (``target_parameters``) is defined on;
checkpoints store them per expert and the HF reader stacks them (``tunelab.models.checkpoint``). Two paths
compute the experts: the reference, a loop over the experts that received tokens, each a dense
SwiGLU on its tokens (exact, in transformers' order of additions; CPU and older GPUs), and the
grouped path, which sorts the (token, slot) pairs by expert and runs each projection as one
``torch._grouped_mm`` over all experts, forward and backward, expert LoRA included (bf16 on
GPUs of compute capability 9.0+; no per-expert Python loop). Both are tested against each other
on CPU, where ``torch._grouped_mm`` runs too.

The load-balancing loss (Switch Transformer's, as transformers computes it) is
:func:`load_balancing_loss` over the router logits each MoE block keeps from its last forward
(``MoE.router_logits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.kernels import gated_act

__all__ = ["BiasedExperts", "BiasedMoE", "Experts", "MoE", "load_balancing_loss", "per_expert"]


class Experts(nn.Module):
    """``n_experts`` SwiGLU MLPs with stacked weights.

    Args:
        n_experts: number of experts E.
        dim: model width.
        hidden_dim: each expert's inner width (``moe_intermediate_size``).
    """

    def __init__(self, n_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        # expert LoRA (tunelab.modules.peft.ExpertLoRA), set by apply_expert_lora
        self.gate_up_lora: nn.Module | None = None
        self.down_lora: nn.Module | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _project(h: torch.Tensor, e: int, weight, lora: nn.Module | None) -> torch.Tensor:
        # a quantized stack (QLoRA's NF4ExpertWeights) multiplies one expert itself
        return _with_lora(weight.linear(h, e) if hasattr(weight, "linear") else F.linear(h, weight[e]), e, h, lora)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, dim], experts [T, k] (ids), weights [T, k] -> sum over each token's k experts
        of weight * expert(x) [T, dim]: the grouped path where it applies, else the reference."""
        if _grouped_applies(x, self.gate_up_proj, self.down_proj):
            return self.forward_grouped(x, experts, weights)
        return self.forward_reference(x, experts, weights)

    def forward_grouped(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The grouped path: (token, slot) pairs sorted by expert, one grouped GEMM per
        projection (and per LoRA factor), the results weighted and added back per token."""
        n_experts = self.gate_up_proj.shape[0]
        flat = experts.reshape(-1)  # (T*k,)
        order = torch.argsort(flat, stable=True)
        token = order // experts.shape[1]  # (T*k,): the token of each sorted pair
        offs = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)  # group ends
        h = x[token]  # (T*k, dim), grouped by expert
        gate, up = _grouped(h, self.gate_up_proj, self.gate_up_lora, offs).chunk(2, dim=-1)
        y = _grouped(gated_act(gate, up), self.down_proj, self.down_lora, offs)  # (T*k, dim)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def forward_reference(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The reference path: one dense SwiGLU per expert that got tokens (:func:`per_expert`)."""

        def expert(e: int, h: torch.Tensor) -> torch.Tensor:
            gate, up = self._project(h, e, self.gate_up_proj, self.gate_up_lora).chunk(2, dim=-1)  # (n_e, hidden)
            return self._project(gated_act(gate, up), e, self.down_proj, self.down_lora)

        return per_expert(x, experts, weights, expert)


def per_expert(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, expert) -> torch.Tensor:
    """The experts one at a time: ``expert(e, h)`` on the tokens h [n_e, dim] routed to each
    expert e that got any, in ascending order, weighted and added back per token as transformers
    adds them. x [T, dim], experts / weights [T, k] -> [T, dim]."""
    out = torch.zeros_like(x)
    for e in torch.unique(experts).tolist():
        token, slot = torch.where(experts == e)  # the tokens routed to e, and at which of their k slots
        out.index_add_(0, token, (expert(e, x[token]) * weights[token, slot, None]).to(out.dtype))
    return out


def _with_lora(y: torch.Tensor, e: int, h: torch.Tensor, lora: nn.Module | None) -> torch.Tensor:
    """``y`` plus expert e's LoRA update of its input h, where an active expert LoRA is set."""
    return y if lora is None or lora.disabled else y + lora.update(e, h)


def _grouped_applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The grouped GEMM path for this call: a bf16 input on a GPU of compute capability 9.0+
    (torch._grouped_mm's kernels) with 16-byte aligned rows."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and all(isinstance(w, torch.Tensor) for w in weights)):  # (not NF4 experts)
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(d % 8 == 0 for w in weights for d in w.shape[1:])


def _grouped(h: torch.Tensor, weight: torch.Tensor, lora: nn.Module | None, offs: torch.Tensor) -> torch.Tensor:
    """h [N, in] grouped by expert (``offs``: cumulative ends) times each group's expert weight
    [E, out, in] transposed, plus the expert LoRA update -> [N, out]."""
    y = torch._grouped_mm(h, weight.transpose(1, 2), offs=offs)
    if lora is None or lora.disabled:
        return y
    a, b = lora.lora_a.to(h.dtype), lora.lora_b.to(h.dtype)  # [E, r, in], [E, out, r]
    ha = torch._grouped_mm(h, a.transpose(1, 2), offs=offs)  # (N, r)
    return y + torch._grouped_mm(ha, b.transpose(1, 2), offs=offs) * lora.scaling


class MoE(nn.Module):
    """Router + experts: ``sum_k w_k * expert_{i_k}(x)`` over the top-k experts of each token.

    Args:
        dim: model width.
        hidden_dim: each expert's inner width.
        n_experts: number of experts.
        top_k: experts per token.
        norm_topk_prob: renormalise the top-k routing weights to sum to 1.

    Attributes:
        router_logits: [tokens, n_experts] of the last forward (for :func:`load_balancing_loss`).
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(dim, n_experts, bias=False)  # the router
        self.experts = Experts(n_experts, dim, hidden_dim)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, s, dim] -> [b, s, dim] (+ ``residual``)."""
        flat = x.reshape(-1, x.shape[-1])  # (T, dim)
        logits = self.gate(flat)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (T, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.router_logits = logits
        out = self.experts(flat, experts, weights.to(logits.dtype)).view_as(x)
        return out if residual is None else residual + out


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over all MoE layers (transformers'
    ``load_balancing_loss_func``): ``E * sum_e f_e * P_e`` where ``f_e`` is the share of routing
    slots that chose expert e and ``P_e`` the mean router probability of e, both over tokens of
    every layer (and, for ``f``, per top-k slot).

    Args:
        router_logits: per MoE layer, [tokens, E].
        n_experts: E.
        top_k: experts per token.
        mask: optional [tokens] bool, True for real tokens (padding left out of both means).

    Returns:
        A scalar (fp32).
    """
    logits = torch.cat([g.float() for g in router_logits], dim=0)  # (L*T, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, n_experts).float()  # (L*T, k, E)
    if mask is None:
        tokens_per_expert = chosen.mean(dim=0)  # (k, E)
        prob_per_expert = probs.mean(dim=0)  # (E,)
    else:
        m = mask.reshape(-1).float().repeat(len(router_logits))  # (L*T,)
        tokens_per_expert = (chosen * m[:, None, None]).sum(0) / m.sum()
        prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * n_experts


class BiasedExperts(nn.Module):
    """gpt-oss's experts: weights stored input-major with biases, gate and up interleaved in
    one projection (``gate_up_proj`` [E, dim, 2 * hidden]: even columns gate, odd columns up;
    ``down_proj`` [E, hidden, dim]), the checkpoint's own layout; and the clamped SwiGLU
    ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.

    Args:
        n_experts, dim, hidden_dim: as in :class:`Experts`.
        alpha, limit: the activation's ``swiglu_alpha`` and ``swiglu_limit``.
    """

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden_dim))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(n_experts, 2 * hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.down_proj_bias = nn.Parameter(torch.zeros(n_experts, dim))
        # expert LoRA (tunelab.modules.peft.ExpertLoRA, transposed), set by apply_expert_lora
        self.gate_up_lora: nn.Module | None = None
        self.down_lora: nn.Module | None = None
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """As :meth:`Experts.forward` (the per-expert loop, :func:`per_expert`)."""

        def expert(e: int, h: torch.Tensor) -> torch.Tensor:
            gate_up = _with_lora(_times(h, self.gate_up_proj, e) + self.gate_up_proj_bias[e], e, h, self.gate_up_lora)
            gate = gate_up[..., ::2].clamp(max=self.limit)  # (n_e, hidden), interleaved columns
            up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
            act = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
            return _with_lora(_times(act, self.down_proj, e) + self.down_proj_bias[e], e, act, self.down_lora)

        return per_expert(x, experts, weights, expert)


def _times(h: torch.Tensor, weight, e: int) -> torch.Tensor:
    """h [n, in] times expert e of an input-major stack [E, in, out] -> [n, out]; a quantized
    stack (QLoRA's NF4ExpertWeights, transposed) multiplies one expert itself."""
    return weight.linear(h, e) if hasattr(weight, "linear") else h @ weight[e]


class BiasedMoE(nn.Module):
    """gpt-oss's MoE block: a router with a bias picks the top-k experts by logit and mixes them
    by the softmax of those k logits, over :class:`BiasedExperts`.

    Args:
        dim, hidden_dim, n_experts, top_k: as in :class:`MoE`.
        alpha, limit: the experts' activation (:class:`BiasedExperts`).

    Attributes:
        router_logits: [tokens, n_experts] of the last forward.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, alpha: float, limit: float) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=True)
        self.experts = BiasedExperts(n_experts, dim, hidden_dim, alpha, limit)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)  # (T, E)
        top, experts = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        self.router_logits = logits
        out = self.experts(flat, experts, weights).view_as(x)
        return out if residual is None else residual + out
