"""Rotary position embeddings (RoPE) in Hugging Face's rotate-half layout.

The head dimension is split in two halves ``[x1, x2]`` and rotated as
``x * cos + [-x2, x1] * sin`` with frequency ``inv_freq[i]`` shared by element ``i`` of each
half. This is the layout of HF Llama checkpoints, so q/k weights load without permutation.

Frequencies are either plain (``theta ** (-2i / head_dim)``), ``linear`` (all divided by
``factor``, Gemma 3), Phi-3's ``longrope`` (each frequency divided by its own factor, from the
short list, or the long one for a batch that reaches past ``original_max_position_embeddings``;
cos/sin scaled by ``attention_factor``) or Llama 3.1's ``llama3`` scaling, which divides the low
frequencies by ``factor`` and interpolates smoothly in between. Partial rotary (Phi) rotates the
first ``rotary_dim`` dims of each head only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.kernels import rope


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32.

    Args:
        head_dim: size of one attention head (even).
        theta: RoPE base (1e4 for Llama 2, 5e5 for Llama 3).
        rope_scaling: None for plain RoPE, ``{"rope_type": "linear", "factor"}``, or
            ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}``.
        device: where to build the tensor.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # positions divided by factor (Gemma 3's global layers)
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "longrope":  # Phi-3: per-frequency divisors (the short set; see RotaryEmbedding)
        return inv_freq / torch.tensor(rope_scaling["short_factor"], dtype=torch.float32, device=device)
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, rope_scaling)
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r}: only default, linear, longrope, yarn and llama3")
    factor = float(rope_scaling["factor"])
    low_freq_factor = float(rope_scaling["low_freq_factor"])
    high_freq_factor = float(rope_scaling["high_freq_factor"])
    old_context = float(rope_scaling["original_max_position_embeddings"])

    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) were never seen whole during pretraining: stretch them.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, blend the stretched and original frequency (same formula as Meta / HF).
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (gpt-oss): frequencies that turn fewer than ``beta_slow`` times over the original
    context are divided by ``factor`` (interpolated), those turning more than ``beta_fast``
    times are kept (extrapolated), with a linear ramp between, in transformers' formulation
    (``truncate`` rounds the ramp's ends outward)."""
    factor, original = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])

    def dim_of(rotations: float) -> float:  # the frequency index that turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, n_heads, s, hd] and k [b, n_kv_heads, s, hd] by cos/sin [b, s, rd]: all of
    each head when ``rd == hd``, else (partial rotary, Phi) its first ``rd`` dims, the rest
    passed through."""
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return rope(q, cos, sin), rope(k, cos, sin)  # Triton on CUDA, PyTorch elsewhere
    return (torch.cat((rope(q[..., :rd], cos, sin), q[..., rd:]), dim=-1),
            torch.cat((rope(k[..., :rd], cos, sin), k[..., rd:]), dim=-1))


class RotaryEmbedding(nn.Module):
    """Computes RoPE cos/sin for arbitrary positions (no length limit, no cache to outgrow).

    ``inv_freq`` is a non-persistent fp32 buffer: it is never saved in checkpoints, and it is
    recomputed whenever the module is moved or cast (``.to(dtype)`` would otherwise round it to
    bf16, and ``to_empty()`` after a meta-device build would leave garbage in it).

    Args:
        head_dim: the rotated dims of one attention head (all of it, or Phi's partial share).
        theta: RoPE base.
        rope_scaling: None or a scaling dict (see ``rope_inv_freq``); ``longrope`` also
            needs ``long_factor``, ``original_max_position_embeddings`` and ``attention_factor``.
    """

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
        self.register_buffer("inv_freq", self._compute(None), persistent=False)
        self.long_inv_freq = self._long(None)  # a plain attribute: rebuilt with inv_freq

    def _compute(self, device) -> torch.Tensor:
        return rope_inv_freq(self.head_dim, self.theta, self.rope_scaling, device=device)

    def _long(self, device) -> torch.Tensor | None:
        """longrope's long-context frequencies (None for other RoPE types)."""
        if self.rope_scaling is None or self.rope_scaling.get("rope_type") != "longrope":
            return None
        long = dict(self.rope_scaling, short_factor=self.rope_scaling["long_factor"])
        return rope_inv_freq(self.head_dim, self.theta, long, device=device)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """(Re)compute ``inv_freq`` in fp32 on ``device`` (default: where it is now)."""
        device = self.inv_freq.device if device is None else device
        self.inv_freq = self._compute(device)
        self.long_inv_freq = self._long(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Casting or materialising must not change the frequencies: rebuild them in fp32.
        self.reset_parameters()
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] int -> (cos, sin) [b, s, head_dim] in ``dtype``.

        Angles are computed in fp32 (positions up to 128k need it) and cast at the end.
        """
        inv_freq = self.inv_freq
        # longrope and yarn scale cos/sin by an attention factor
        scale = (self.rope_scaling or {}).get("attention_factor", 1.0)
        if self.long_inv_freq is not None:  # longrope: the whole batch on one set, as transformers
            long = position_ids.max() + 1 > self.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(long, self.long_inv_freq, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (b, s, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, hd): same frequency for both halves
        if scale != 1.0:
            return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, rope_scaling={self.rope_scaling}"
