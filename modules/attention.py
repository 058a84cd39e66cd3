"""Grouped-query self-attention with RoPE and an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.modules.rope import apply_rope


class KVCache(nn.Module):
    """Keys and values of past positions for incremental decoding.

    Buffers are non-persistent, so a model with caches set up still saves and loads the same
    state dict.

    Args:
        batch_size: largest batch the cache serves.
        max_seq_len: number of positions it holds.
        n_kv_heads: key/value heads (GQA: fewer than query heads).
        head_dim: size of one head.
        dtype: cache dtype (normally the model's).
        device: where to allocate it.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, n_kv_heads, s, hd] at ``input_pos`` [s]; return the whole cache
        [b, n_kv_heads, max_seq_len, hd] (positions not yet written are masked by the caller)."""
        b = k.shape[0]
        self.k_cache[:b, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:b, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:b], self.v_cache[:b]


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads (``n_kv_heads`` divides ``n_heads``).

    q/k/v/o projections are plain ``nn.Linear(bias=False)`` attributes (LoRA swaps them by leaf
    name). Attention runs through ``F.scaled_dot_product_attention``: with ``is_causal`` when
    no mask is given (lets the fused kernels skip the mask), else with the boolean ``mask``
    (True = may attend).

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads.
        head_dim: size of one head (``n_heads * head_dim`` need not equal ``dim``).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [b, s, dim], cos/sin [b, s, head_dim], mask None (causal) or bool broadcastable to
        [b, n_heads, s, s_kv], input_pos [s] (only with a KV cache) -> [b, s, dim]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # (b, nh, s, hd)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (b, nkv, s, hd)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)

        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("input_pos is required when KV caches are set up")
            k, v = self.kv_cache.update(input_pos, k, v)  # (b, nkv, max_seq_len, hd)

        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            # Each kv head serves n_rep consecutive query heads (HF's repeat_kv order).
            k = k.repeat_interleave(n_rep, dim=1)  # (b, nh, s_kv, hd)
            v = v.repeat_interleave(n_rep, dim=1)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)  # (b, s, nh*hd)
        return self.o_proj(out)
