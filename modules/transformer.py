"""The decoder: embeddings, pre-norm decoder layers, final norm, output head (Llama's shape,
with what the other families change as switches: q/k norms, q/k/v biases, Gemma's sandwich
norms, GeGLU, scaled embeddings, sliding-window layers, Phi's fused projections and partial
RoPE, Qwen3-MoE's expert layers)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.modules.attention import Attention, BlockMask, KVCache, document_mask, window_mask
from tunelab.modules.feed_forward import FeedForward
from tunelab.modules.moe import BiasedMoE, MoE
from tunelab.modules.recompute import is_recomputing
from tunelab.modules.rms_norm import RMSNorm
from tunelab.modules.rope import RotaryEmbedding
from tunelab.modules.tiling import tiled


class TransformerDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))``; with
    ``sandwich`` (Gemma) each sublayer's output is normed too before the residual add:
    ``h = x + attn_post_norm(attn(attn_norm(x)))``, ``out = h + mlp_post_norm(mlp(mlp_norm(h)))``.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads.
        head_dim: size of one head.
        hidden_dim: MLP inner width.
        norm_eps: RMSNorm epsilon.
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3), with ``norm_eps``.
        qkv_bias: biases on the q, k and v projections (Qwen2).
        sliding_window: attend over the last ``sliding_window`` positions only (None: all).
        attn_scale: the query scaling (None: ``head_dim ** -0.5``).
        norm_plus_one: Gemma's RMSNorm (``1 + weight``, fp32) everywhere in the layer.
        sandwich: Gemma's post-attention and post-MLP norms.
        act: the MLP gate's activation, ``silu`` or ``gelu_tanh``.
        fused: Phi-3's fused ``qkv_proj`` and ``gate_up_proj``.
        moe: ``(n_experts, top_k, expert hidden dim, norm_topk_prob)`` for a mixture-of-experts
            MLP (Qwen3-MoE) in place of the dense one; None = dense.
        biased_moe: ``(alpha, limit)``: the MoE MLP is gpt-oss's (``BiasedMoE``) instead.
        o_bias, sinks: gpt-oss's attention output bias and per-head sinks.

    ``mlp_tile`` (attribute, default None): tokens per tile of a sequence-tiled MLP block
    (``modules.tiling``: norm, MLP and residual add a tile at a time in forward and backward,
    so the MLP's wide intermediates exist for one tile); dense MLPs only, set by the caller
    (``training.steps.wrap_layers``). ``mlp_block`` is what is tiled.
    """

    def __init__(
        self, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden_dim: int, norm_eps: float,
        qk_norm: bool = False, qkv_bias: bool = False, sliding_window: int | None = None,
        attn_scale: float | None = None, norm_plus_one: bool = False, sandwich: bool = False, act: str = "silu",
        fused: bool = False, moe: tuple[int, int, int, bool] | None = None,
        biased_moe: tuple[float, float] | None = None, o_bias: bool = False, sinks: bool = False,
    ) -> None:
        super().__init__()
        norm = dict(eps=norm_eps, plus_one=norm_plus_one)
        self.attn_norm = RMSNorm(dim, **norm)
        self.attn = Attention(dim, n_heads, n_kv_heads, head_dim, qk_norm=norm_eps if qk_norm else None,
                              qkv_bias=qkv_bias, sliding_window=sliding_window, scale=attn_scale,
                              norm_plus_one=norm_plus_one, fused_qkv=fused, o_bias=o_bias, sinks=sinks)
        self.attn_post_norm = RMSNorm(dim, **norm) if sandwich else None
        self.mlp_norm = RMSNorm(dim, **norm)
        if moe is not None and biased_moe is not None:
            n_experts, top_k, expert_dim, _ = moe
            self.mlp = BiasedMoE(dim, expert_dim, n_experts, top_k, *biased_moe)
        elif moe is not None:
            n_experts, top_k, expert_dim, norm_topk_prob = moe
            self.mlp = MoE(dim, expert_dim, n_experts, top_k, norm_topk_prob)
        else:
            self.mlp = FeedForward(dim, hidden_dim, act=act, fused_gate_up=fused)
        self.mlp_post_norm = RMSNorm(dim, **norm) if sandwich else None
        self.mlp_tile: int | None = None

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., dim] -> the layer's output [..., dim]: ``h + mlp(mlp_norm(h))`` (sandwich:
        the MLP's output normed before the add); every token on its own."""
        if self.mlp_post_norm is not None:
            return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h)))
        return self.mlp(self.mlp_norm(h), residual=h)  # the add inside the down projection (project_onto)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.attn_post_norm is not None:  # Gemma: the sublayer outputs are normed before the adds
            h = x + self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, mask=mask, input_pos=input_pos))
        else:  # the residual add happens inside the output projection (see project_onto)
            h = self.attn(self.attn_norm(x), cos, sin, mask=mask, input_pos=input_pos, residual=x)
        if self.mlp_tile is None:
            return self.mlp_block(h)
        params = [p for m in (self.mlp_norm, self.mlp, self.mlp_post_norm) if m is not None for p in m.parameters()]
        return tiled(self.mlp_block, h, self.mlp_tile, params, unread=is_recomputing())


class TransformerDecoder(nn.Module):
    """A Llama-family decoder-only model.

    State-dict names: ``tok_embeddings.weight``, ``layers.{i}.attn_norm.weight``,
    ``layers.{i}.attn.{q,k,v,o}_proj.weight`` (``attn.{q,k}_norm.weight`` with qk_norm,
    ``attn.{q,k,v}_proj.bias`` with qkv_bias),
    (fused, Phi-3: ``attn.qkv_proj.weight``, ``mlp.gate_up_proj.weight``; MoE layers:
    ``mlp.gate.weight``, the router, and ``mlp.experts.{gate_up,down}_proj`` [E, ...]),
    ``layers.{i}.mlp_norm.weight``, (sandwich) ``layers.{i}.{attn,mlp}_post_norm.weight``,
    ``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``norm.weight`` and ``output.weight``
    (absent with tied embeddings: logits then use ``tok_embeddings.weight``). RoPE frequencies
    are a computed, non-persistent buffer; sliding-window layers get their own RoPE base
    (``rope_local``) where ``rope_local_theta`` is set (Gemma 3).

    Args:
        args: the architecture, a ``tunelab.models.llama.ModelArgs``. Kept as ``model.args``.
    """

    def __init__(self, args: Any) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(
                dim=args.dim,
                n_heads=args.n_heads,
                n_kv_heads=args.n_kv_heads,
                head_dim=args.head_dim,
                hidden_dim=args.hidden_dim,
                norm_eps=args.norm_eps,
                qk_norm=args.qk_norm,
                qkv_bias=args.qkv_bias,
                sliding_window=args.sliding_window if args.is_sliding(i) else None,
                attn_scale=args.attn_scale,
                norm_plus_one=args.norm_plus_one,
                sandwich=args.sandwich_norm,
                act=args.hidden_act,
                fused=args.fused_projections,
                moe=((args.n_experts, args.experts_per_token, args.moe_hidden_dim, args.norm_topk_prob)
                     if args.is_moe(i) else None),
                biased_moe=(args.swiglu_alpha, args.swiglu_limit) if args.swiglu_limit is not None else None,
                o_bias=args.o_bias,
                sinks=args.attn_sinks,
            )
            for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, eps=args.norm_eps, plus_one=args.norm_plus_one)
        if not args.tie_word_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.rotary_dim or args.head_dim, args.rope_theta, args.rope_scaling)
        self.rope_local = (RotaryEmbedding(args.head_dim, args.rope_local_theta)
                           if args.rope_local_theta is not None else None)
        self.causal_mask: torch.Tensor | None = None  # set by setup_caches
        self.window_cache_mask: torch.Tensor | None = None

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute the RoPE frequencies (fp32) on ``device``: after building on the meta
        device and loading weights with ``assign=True``."""
        for rope in (self.rope, self.rope_local):
            if rope is not None:
                rope.reset_parameters(device)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix that maps final hidden states to logits (tied or not).

        Raises:
            ConfigError: ``output`` is not a plain linear layer (LoRA or quantized), so its
                logits are not ``hidden @ output_weight.T`` and a fused loss would be wrong.
        """
        if self.args.tie_word_embeddings:
            return self.tok_embeddings.weight
        if type(self.output) is not nn.Linear:
            raise ConfigError(
                f"the output layer is a {type(self.output).__name__}, so output_weight alone does "
                "not give the logits; drop 'output' from lora.targets or use the unfused loss"
            )
        return self.output.weight

    # ---------------------------------------------------------------- KV cache
    def setup_caches(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate a KV cache in every layer (replacing any previous one).

        Args:
            batch_size: largest batch that will be decoded.
            max_seq_len: prompt + generated positions the cache holds.
            dtype: cache dtype (default: the embedding dtype).
            device: cache device (default: the embedding device).
        """
        ref = self.tok_embeddings.weight
        dtype = ref.dtype if dtype is None else dtype
        device = ref.device if device is None else device
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype, device)
        # Query at position p may see cached keys 0..p; rows are indexed by input_pos.
        self.causal_mask = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))
        if self.args.sliding_window is not None:  # ... and sliding layers only the last `window` of them
            i = torch.arange(max_seq_len, device=device)
            self.window_cache_mask = self.causal_mask & (i[:, None] - i[None, :] < self.args.sliding_window)

    def reset_caches(self) -> None:
        """Zero the KV caches (start a new sequence) without reallocating them."""
        if not self.caches_are_enabled():
            raise RuntimeError("reset_caches() called before setup_caches()")
        for layer in self.layers:
            layer.attn.kv_cache.reset()

    def teardown_caches(self) -> None:
        """Free the KV caches; the model goes back to full-sequence (training) mode."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.causal_mask = None
        self.window_cache_mask = None

    def caches_are_enabled(self) -> bool:
        return self.causal_mask is not None

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [b, s] int64 -> logits [b, s, vocab] (or final-normed hidden [b, s, dim]).

        Args:
            tokens: token ids [b, s].
            position_ids: RoPE positions [b, s] (default ``arange(s)``, or ``input_pos`` when
                decoding with a cache). Packed rows restart them at each document.
            document_ids: [b, s] ids of packed documents; attention is causal and confined to
                positions with the same id (flex_attention on CUDA, masked SDPA on CPU). Not
                supported together with a KV cache.
            input_pos: [s] positions to write into / attend over in the KV cache; required
                when caches are set up, ignored otherwise.
            return_hidden: return the final-normed hidden states instead of logits (a fused
                or chunked loss then multiplies by ``model.output_weight`` itself).
        """
        b, s = tokens.shape
        h = self.tok_embeddings(tokens)  # (b, s, dim)
        if self.args.embed_scale is not None:  # Gemma: times sqrt(dim), rounded to h's dtype first
            h = h * torch.tensor(self.args.embed_scale, dtype=h.dtype, device=h.device)

        mask = local_mask = None
        windowed = self.args.sliding_window is not None
        if self.caches_are_enabled():
            if input_pos is None:
                raise ValueError("input_pos [s] is required when KV caches are set up")
            if document_ids is not None:
                raise ValueError("document_ids (packing) cannot be combined with a KV cache")
            mask = self.causal_mask[None, None, input_pos]  # (1, 1, s, cache_len)
            if windowed:
                local_mask = self.window_cache_mask[None, None, input_pos]
            if position_ids is None:
                position_ids = input_pos[None].expand(b, s)
        else:
            input_pos = None
            if document_ids is not None:
                # Built once here, outside the (possibly checkpointed / compiled) layers, and
                # shared by all of them: a flex BlockMask on CUDA, a dense [b, 1, s, s] bool
                # mask on CPU (see tunelab.modules.attention).
                # (sinks, gpt-oss, take the dense mask: flex has no sinks here)
                mask = document_mask(document_ids, use_flex=False if self.args.attn_sinks else None)
            if windowed:  # a dense [1 or b, 1, s, s] mask (None while the window covers the row)
                local_mask = window_mask(s, self.args.sliding_window, tokens.device, document_ids)
        if position_ids is None:
            position_ids = torch.arange(s, device=tokens.device)[None].expand(b, s)

        cos, sin = self.rope(position_ids, dtype=h.dtype)  # (b, s, head_dim) each
        local_cos, local_sin = cos, sin
        if self.rope_local is not None:
            local_cos, local_sin = self.rope_local(position_ids, dtype=h.dtype)
        for layer in self.layers:
            if layer.attn.sliding_window is not None:
                h = layer(h, local_cos, local_sin, mask=local_mask, input_pos=input_pos)
            else:
                h = layer(h, cos, sin, mask=mask, input_pos=input_pos)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.logits_from_hidden(h)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., dim] -> logits [..., vocab] (the output head)."""
        if self.args.tie_word_embeddings:
            return F.linear(h, self.tok_embeddings.weight)
        # Call the module (not its weight) so a LoRA/NF4 layer swapped in for `output` applies.
        return self.output(h)
