"""Published Llama sizes as ``ModelArgs``, plus ``build_model``.

Numbers follow Meta's params.json / the HF hub config.json of each model. Builders take
keyword overrides (e.g. ``llama3_1_8b(max_seq_len=8192)``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tunelab.models.llama.args import ModelArgs
from tunelab.modules.transformer import TransformerDecoder


def build_model(
    args: ModelArgs,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TransformerDecoder:
    """Build a randomly initialised ``TransformerDecoder`` for ``args``.

    Args:
        args: the architecture.
        device: where to allocate parameters; ``"meta"`` builds without memory (then load with
            ``load_state_dict(assign=True)`` and call ``model.reset_rope(device)``).
        dtype: parameter dtype (default: torch's default dtype). RoPE stays fp32.
    """
    old_dtype = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device if device is not None else "cpu"):
            return TransformerDecoder(args)
    finally:
        torch.set_default_dtype(old_dtype)


def _with(args: ModelArgs, overrides: dict) -> ModelArgs:
    return replace(args, **overrides) if overrides else args


def _llama3_scaling(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(
    vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, bos_token_id=128000, eos_token_id=128001
)
_LLAMA3_1 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=_llama3_scaling(8.0))
_LLAMA3_2 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=_llama3_scaling(32.0), tie_word_embeddings=True)


def llama2_7b(**overrides) -> ModelArgs:
    """Llama 2 7B: 32 layers, dim 4096, 32 heads (MHA), ffn 11008, vocab 32000."""
    return _with(ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, **_LLAMA2), overrides)


def llama2_13b(**overrides) -> ModelArgs:
    """Llama 2 13B: 40 layers, dim 5120, 40 heads (MHA), ffn 13824."""
    return _with(ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, **_LLAMA2), overrides)


def llama2_70b(**overrides) -> ModelArgs:
    """Llama 2 70B: 80 layers, dim 8192, 64 heads / 8 kv heads, ffn 28672."""
    return _with(ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, **_LLAMA2), overrides)


def llama3_8b(**overrides) -> ModelArgs:
    """Llama 3 8B: 32 layers, dim 4096, 32 heads / 8 kv heads, ffn 14336, vocab 128256, theta 5e5."""
    return _with(ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, **_LLAMA3), overrides)


def llama3_70b(**overrides) -> ModelArgs:
    """Llama 3 70B: 80 layers, dim 8192, 64 heads / 8 kv heads, ffn 28672."""
    return _with(ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, **_LLAMA3), overrides)


def llama3_1_8b(**overrides) -> ModelArgs:
    """Llama 3.1 8B: Llama 3 8B with llama3 RoPE scaling (factor 8) and 128k context."""
    return _with(ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, **_LLAMA3_1), overrides)


def llama3_1_70b(**overrides) -> ModelArgs:
    """Llama 3.1 70B: 80 layers, dim 8192, 64 heads / 8 kv heads, ffn 28672, scaling factor 8."""
    return _with(ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, **_LLAMA3_1), overrides)


def llama3_1_405b(**overrides) -> ModelArgs:
    """Llama 3.1 405B: 126 layers, dim 16384, 128 heads / 8 kv heads, ffn 53248."""
    return _with(
        ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, hidden_dim=53248, **_LLAMA3_1), overrides
    )


def llama3_2_1b(**overrides) -> ModelArgs:
    """Llama 3.2 1B: 16 layers, dim 2048, 32 heads / 8 kv heads, ffn 8192, tied, scaling factor 32."""
    return _with(
        ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192, **_LLAMA3_2),
        overrides,
    )


def llama3_2_3b(**overrides) -> ModelArgs:
    """Llama 3.2 3B: 28 layers, dim 3072, 24 heads / 8 kv heads, head_dim 128, ffn 8192, tied."""
    return _with(
        ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192, **_LLAMA3_2),
        overrides,
    )


def tiny(
    *,
    vocab_size: int = 1024,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden_dim: int = 160,
    max_seq_len: int = 256,
    tie_word_embeddings: bool = False,
    rope_theta: float = 500000.0,
    rope_scaling: dict | None = None,
    **overrides,
) -> ModelArgs:
    """A tiny GQA Llama for tests and CPU smoke runs (~0.2M parameters by default).

    Args:
        vocab_size: must cover the tokenizer used with it.
        dim, n_layers, n_heads, n_kv_heads, hidden_dim, max_seq_len, tie_word_embeddings,
        rope_theta, rope_scaling: as in ``ModelArgs``.
    """
    return ModelArgs(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        **overrides,
    )
