"""``ModelArgs``: the architecture of a Llama-family model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelArgs:
    """Architecture hyperparameters (HF ``config.json`` names in brackets).

    Args:
        vocab_size: embedding rows [vocab_size].
        dim: model width [hidden_size].
        n_layers: decoder layers [num_hidden_layers].
        n_heads: query heads [num_attention_heads].
        n_kv_heads: key/value heads, None = n_heads [num_key_value_heads].
        head_dim: size of one head, None = dim // n_heads [head_dim].
        hidden_dim: SwiGLU inner width [intermediate_size].
        norm_eps: RMSNorm epsilon [rms_norm_eps].
        rope_theta: RoPE base [rope_theta].
        rope_scaling: None (plain RoPE) or ``{"rope_type": "llama3", "factor",
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``.
        max_seq_len: longest context the model was trained for [max_position_embeddings];
            informational (RoPE is computed for any position).
        tie_word_embeddings: logits reuse the embedding matrix (no ``output`` layer).
        bos_token_id: optional, carried to config.json.
        eos_token_id: optional int or list of ints, carried to config.json.
        model_type: the HF family the weights came from and are saved as [model_type]:
            ``llama``, ``mistral`` (the same network; its own config class in transformers),
            ``qwen2`` or ``qwen3``.
        qk_norm: a per-head RMSNorm on q and k before RoPE (Qwen3; weights [head_dim]).
        qkv_bias: the q, k and v projections have biases (Qwen2 / Qwen2.5).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"
    qk_norm: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
