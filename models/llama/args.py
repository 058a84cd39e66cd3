"""``ModelArgs``: the architecture of a decoder-only model of the supported families (Llama's
shape plus the switches the others need)."""

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
        sliding_window: size of the attention window of sliding layers [sliding_window]:
            query i sees keys i - window + 1 ... i.
        layer_types: per layer ``"full_attention"`` or ``"sliding_attention"`` [layer_types];
            None = every layer full, or every layer sliding when ``sliding_window`` is set.
        rope_local_theta: RoPE base of the sliding layers, which then use no rope scaling
            (Gemma 3's rope_local_base_freq); None = the global RoPE everywhere.
        attn_scale: query scaling (Gemma 3: query_pre_attn_scalar ** -0.5); None = head_dim ** -0.5.
        norm_plus_one: Gemma's RMSNorm (scale 1 + weight, computed in fp32).
        sandwich_norm: Gemma's extra norms on the attention and MLP outputs.
        hidden_act: MLP gate activation, ``"silu"`` or ``"gelu_tanh"`` (Gemma).
        embed_scale: multiply the embeddings by this (Gemma: sqrt(dim)); None = no scaling.
        fused_projections: Phi-3's fused ``qkv_proj`` ([q; k; v]) and ``gate_up_proj``
            ([gate; up]) in place of separate projections.
        rotary_dim: dims of each head RoPE rotates (Phi's partial_rotary_factor x head_dim);
            None = all of them.
        n_experts: experts per MoE layer (Qwen3-MoE's num_experts); 0 = a dense model.
        experts_per_token: experts each token is routed to [num_experts_per_tok].
        moe_hidden_dim: each expert's inner width [moe_intermediate_size].
        norm_topk_prob: renormalise the top-k routing weights [norm_topk_prob].
        mlp_only_layers: layers with a dense MLP in an MoE model [mlp_only_layers].
        decoder_sparse_step: every this-many-th layer is an MoE layer [decoder_sparse_step].
        router_aux_loss_coef: weight of the load-balancing loss in training [router_aux_loss_coef].
        swiglu_limit: gpt-oss's experts (biased, clamped SwiGLU, router with a bias; see
            ``modules.moe.BiasedMoE``) [swiglu_limit]; None = Qwen3-MoE's experts.
        swiglu_alpha: the sigmoid's slope in gpt-oss's activation [swiglu_alpha].
        o_bias: a bias on the attention output projection (gpt-oss).
        attn_sinks: a learned sink logit per attention head (gpt-oss).
        multimodal: the language model of an image-text checkpoint (Gemma 3 4B+,
            ``Gemma3ForConditionalGeneration``): its weights sit under ``language_model.`` and
            its vision tensors are carried through exports untouched.
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
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None
    attn_scale: float | None = None
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    hidden_act: str = "silu"
    embed_scale: float | None = None
    fused_projections: bool = False
    n_experts: int = 0
    experts_per_token: int = 0
    moe_hidden_dim: int | None = None
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] | None = None
    decoder_sparse_step: int = 1
    router_aux_loss_coef: float = 0.0
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    o_bias: bool = False
    attn_sinks: bool = False
    rotary_dim: int | None = None
    multimodal: bool = False

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
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ValueError(f"layer_types holds {bad}; each entry is full_attention or sliding_attention")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.n_experts and not (0 < self.experts_per_token <= self.n_experts and self.moe_hidden_dim):
            raise ValueError(f"experts_per_token ({self.experts_per_token}) must be in [1, n_experts "
                             f"({self.n_experts})] and moe_hidden_dim set")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and within head_dim ({self.head_dim})")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not silu or gelu_tanh")

    def is_moe(self, layer: int) -> bool:
        """Is layer ``layer`` a mixture-of-experts layer (transformers' Qwen3-MoE rule)?"""
        return (self.n_experts > 0 and layer not in (self.mlp_only_layers or ())
                and (layer + 1) % self.decoder_sparse_step == 0)

    def is_sliding(self, layer: int) -> bool:
        """Does layer ``layer`` attend over a sliding window?"""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"
