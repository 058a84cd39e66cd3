"""Grouped-query self-attention with RoPE and an optional KV cache.

Which kernel runs is decided per call from what the caller passes, so nothing has to be
threaded through configs:

- **Causal rows, no mask** (training without packing): ``F.scaled_dot_product_attention`` with
  ``is_causal=True`` under the SDPA backend policy below (:func:`causal_attention`).
- **Packed rows on CUDA**: ``TransformerDecoder.forward`` builds one flex-attention
  ``BlockMask`` per forward from ``document_ids`` (:func:`document_mask`: causal AND same
  document, block-sparse, so whole blocks of other documents are skipped) and every layer runs
  ``flex_attention`` on it (:func:`flex_document_attention`), compiled once per process
  (lazily) or captured into the layer's graph when the layer itself is compiled.
- **Packed rows on CPU, and KV-cache decoding**: SDPA with a dense boolean mask (the exact
  reference; flex on CPU has no backward).

Under activation checkpointing with offloaded activations, RoPE + the attention kernel form a
*kept region* (:func:`rope_attention` through ``modules.recompute.kept``): their saved tensors
are offloaded instead of recomputed, and the rerun also skips the q/k/v projections.

Switches, environment variables read once (at the first model built or the first call):

- ``TUNELAB_SDPA_BACKEND=auto|cudnn|flash|efficient|math`` (default ``auto``): the SDPA
  backend of the unmasked causal path. ``auto`` is torch's own choice; grouped-query k/v are
  handed over as they are (``enable_gqa=True``) for bf16/fp16 on GPUs of compute capability
  8.0+, whose flash and cuDNN kernels take them (torch picks cuDNN on an H200; with the
  ``cudnn`` switch, the same path, the 8B fast step ran +0.5% tokens/s at 1.5 GiB less peak
  than with expanded copies in two calls, bench/results/h200.jsonl), and expanded to all query
  heads elsewhere (older GPUs' memory-efficient kernel would fall back to math). A named
  backend is put first in torch's priority order (``sdpa_kernel(..., set_priority=True)``,
  traced by torch.compile) with the others kept as fallbacks, so a shape it does not support
  still runs. ``cudnn`` and ``flash`` take grouped-query k/v as they are (``enable_gqa=True``):
  no expanded copies of k and v, which also saves their memory. A bad value raises
  ``ConfigError`` naming the switch.
- ``TUNELAB_PACKED_ATTENTION=flex|sdpa`` (default ``flex``): packed rows on CUDA run compiled
  flex_attention on the block-sparse document mask; ``sdpa`` takes the dense-mask SDPA path
  there too (CPU always does). Measured on an H200 (bench/results/kernels.jsonl,
  attention_bench.py): 0.72 ms fwd+bwd for flex against 2.00 ms for the dense mask at 2 x 2048
  tokens, 32 heads; the packed 8B recipe went from 0.75x to 0.84x of the dense tokens/s
  (bench/results/h200.jsonl, recipe_packed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from tunelab.errors import ConfigError
from tunelab.modules.projections import project, project_onto
from tunelab.modules.recompute import is_recomputing, keeps_regions, kept
from tunelab.modules.rms_norm import RMSNorm
from tunelab.modules.rope import apply_rope

SDPA_BACKEND_ENV = "TUNELAB_SDPA_BACKEND"
PACKED_ATTENTION_ENV = "TUNELAB_PACKED_ATTENTION"
_SINK_COLUMNS = 8  # sink_attention's column in the head dim, padded so hd stays a multiple of 8

# Fallback order after the preferred backend: torch's own default order (math always last, so
# any input still runs).
_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
SDPA_BACKEND_CHOICES = ("auto", "cudnn", "flash", "efficient", "math")
# Backends whose kernels take fewer k/v heads than q heads themselves (flash and cuDNN do; the
# memory-efficient kernel only in recent torch, and math expands internally).
_NATIVE_GQA = ("cudnn", "flash")
PACKED_ATTENTION_CHOICES = ("flex", "sdpa")
FLEX_BLOCK_SIZE = 128  # flex_attention's default tile: the unit at which blocks are skipped


@dataclass(frozen=True)
class SDPAPolicy:
    """How the unmasked causal path calls SDPA.

    Args:
        name: the switch's value (``auto``, ``cudnn``, ``flash``, ``efficient``, ``math``).
        backends: priority order handed to ``sdpa_kernel(..., set_priority=True)``; ``None``
            leaves torch's own choice untouched.
        native_gqa: pass grouped-query k/v with ``enable_gqa=True`` instead of expanding them.
    """

    name: str
    backends: tuple[SDPBackend, ...] | None
    native_gqa: bool


def parse_sdpa_backend(value: str) -> SDPAPolicy:
    """The policy for one value of ``TUNELAB_SDPA_BACKEND``.

    Raises:
        ConfigError: ``value`` is not one of :data:`SDPA_BACKEND_CHOICES`.
    """
    name = value.strip().lower()
    if name not in SDPA_BACKEND_CHOICES:
        raise ConfigError(f"{SDPA_BACKEND_ENV}={value!r} is not an SDPA backend; use one of "
                          f"{', '.join(SDPA_BACKEND_CHOICES)} (or unset it for auto)")
    if name == "auto":
        return SDPAPolicy("auto", None, False)
    order = (_BACKENDS[name], *(b for n, b in _BACKENDS.items() if n != name))
    return SDPAPolicy(name, order, name in _NATIVE_GQA)


_sdpa_policy: SDPAPolicy | None = None
_packed_attention: str | None = None


def sdpa_policy() -> SDPAPolicy:
    """The process's SDPA policy, read from ``TUNELAB_SDPA_BACKEND`` on first use and cached
    (a compiled layer then sees a constant)."""
    global _sdpa_policy
    if _sdpa_policy is None:
        _sdpa_policy = parse_sdpa_backend(os.environ.get(SDPA_BACKEND_ENV, "auto"))
    return _sdpa_policy


def packed_attention() -> str:
    """``flex`` or ``sdpa``: the packed-row path on CUDA, from ``TUNELAB_PACKED_ATTENTION``
    (read once).

    Raises:
        ConfigError: the variable holds another value.
    """
    global _packed_attention
    if _packed_attention is None:
        value = os.environ.get(PACKED_ATTENTION_ENV, "flex")
        if value.strip().lower() not in PACKED_ATTENTION_CHOICES:
            raise ConfigError(f"{PACKED_ATTENTION_ENV}={value!r} is not a packed-attention path; use one of "
                              f"{', '.join(PACKED_ATTENTION_CHOICES)} (or unset it for flex)")
        _packed_attention = value.strip().lower()
    return _packed_attention


def set_attention_switches(sdpa_backend: str | None = None, packed: str | None = None) -> None:
    """Override the switches in-process (tests, benchmarks); ``None`` forgets the override so
    the environment is read again at the next use.

    Args:
        sdpa_backend: a ``TUNELAB_SDPA_BACKEND`` value, or None.
        packed: a ``TUNELAB_PACKED_ATTENTION`` value, or None.
    """
    global _sdpa_policy, _packed_attention
    _sdpa_policy = None if sdpa_backend is None else parse_sdpa_backend(sdpa_backend)
    _packed_attention = None
    if packed is not None:
        if packed not in PACKED_ATTENTION_CHOICES:
            raise ConfigError(f"packed attention {packed!r} is not one of {', '.join(PACKED_ATTENTION_CHOICES)}")
        _packed_attention = packed


# ---------------------------------------------------------------- kernels
def _expand_kv(k: torch.Tensor, v: torch.Tensor, n_rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [b, nkv, s, hd] -> [b, nkv * n_rep, s, hd]: kv head j serves query heads
    j * n_rep ... j * n_rep + n_rep - 1 (HF's repeat_kv order, and enable_gqa's)."""
    if n_rep == 1:
        return k, v
    return k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)


def _gqa_kernels(q: torch.Tensor) -> bool:
    """Do torch's own SDPA choices for ``q`` take grouped-query k/v natively? bf16/fp16 on a GPU
    of compute capability 8.0+ (flash, cuDNN); elsewhere the memory-efficient kernel may be
    picked, which would fall back to math with ``enable_gqa``."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _capability_at_least_8(q.device.index)


def _capability_at_least_8(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


# A property of the device: a constant in compiled layers. This is all that
# torch.compiler.assume_constant_result does; the decorator itself would import torch._dynamo
# (~1 s of every process's start). tests/modules/test_attention_backends.py checks the attribute.
_capability_at_least_8._dynamo_marked_constant = True


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: SDPAPolicy | None = None, gqa: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal self-attention without a mask tensor, under an SDPA backend policy.

    Args:
        q: [b, nh, s, hd].
        k: [b, nkv, s, hd] with ``nh % nkv == 0``.
        v: like ``k``.
        policy: default :func:`sdpa_policy` (the environment switch).
        gqa: under the ``auto`` policy, hand k/v to SDPA with ``enable_gqa=True`` instead of
            expanding them also where :func:`_gqa_kernels` would not (kept attention: the
            expanded copies would be what SDPA saves).
        scale: the query scaling (None: ``head_dim ** -0.5``).

    Returns:
        [b, nh, s, hd].
    """
    policy = sdpa_policy() if policy is None else policy
    n_rep = q.shape[1] // k.shape[1]
    if policy.backends is None:
        if n_rep > 1 and (gqa or _gqa_kernels(q)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
        k, v = _expand_kv(k, v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    gqa = policy.native_gqa and n_rep > 1
    if not gqa:
        k, v = _expand_kv(k, v, n_rep)
    # The context manager (not a global setting) so other SDPA users in the process keep
    # torch's defaults; dynamo traces it, so a compiled layer bakes the choice into its graph.
    with sdpa_kernel(list(policy.backends), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)


_compiled_flex = None


def _flex_compiled():
    """``torch.compile(flex_attention)``, built at first use: eager flex_attention is an
    unfused reference that materialises the scores; compiled, it is one fused block-sparse
    kernel forward and backward."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float | None = None
) -> torch.Tensor:
    """flex_attention over a :func:`document_block_mask` (grouped-query k/v used as they are).

    Args:
        q: [b, nh, s, hd].
        k: [b, nkv, s, hd] with ``nh % nkv == 0``.
        v: like ``k``.
        block_mask: built for ``b`` rows of ``s`` tokens.
        scale: the query scaling (None: ``head_dim ** -0.5``).

    Returns:
        [b, nh, s, hd].
    """
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling() or not q.is_cuda:
        # Inside a compiled layer dynamo captures this call into the layer's own graph (a
        # nested compiled function would only add a graph break). On CPU the eager reference
        # runs (tests; forward only: torch has no CPU flex backward).
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa, scale=scale)
    return _flex_compiled()(q, k, v, block_mask=block_mask, enable_gqa=gqa, scale=scale)


def document_block_mask(document_ids: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """A flex-attention ``BlockMask``: query i sees key j iff ``j <= i`` and both carry the
    same document id (per row).

    Built from block-level min/max of the ids, never a dense [s, s] mask: a (query block, key
    block) tile is skipped when it lies above the diagonal or its id ranges do not overlap,
    is "full" (the kernel skips the mask function) when it lies strictly below the diagonal
    and both blocks hold one and the same id, and is "partial" (mask function applied per
    element) otherwise. Skipped and full tiles are exact for any ids; for ids that never
    decrease along the row (packed rows) the partial set is exactly the tiles that mix.

    Args:
        document_ids: [b, s] integer ids.
        block_size: tile size (flex_attention's default is 128).

    Returns:
        A BlockMask of shape [b, 1, s, s] (broadcast over heads).
    """
    b, s = document_ids.shape
    device = document_ids.device
    n = -(-s // block_size)
    pad = n * block_size - s
    # Pad the last block with copies of the row's last id: that leaves its id range unchanged.
    ids = torch.cat([document_ids, document_ids[:, -1:].expand(b, pad)], dim=1).view(b, n, block_size)
    lo, hi = ids.amin(-1), ids.amax(-1)  # (b, n)
    blk = torch.arange(n, device=device)
    qb, kb = blk[:, None], blk[None, :]  # (n, 1), (1, n)
    overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # (b, nq, nk)
    single = lo == hi  # (b, n): the block holds one document
    complete = (blk + 1) * block_size <= s  # the last block may be cut short by the row end
    full = (
        (kb < qb)
        & (single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :]))
        & (complete[:, None] & complete[None, :])
    )
    partial = (kb <= qb) & overlap & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (b, nq, nk) bool -> counts (b, 1, nq) and key-block indices (b, 1, nq, nk) with the
        # selected blocks first in ascending order (BlockMask's layout; the rest is ignored).
        dense = dense[:, None].to(torch.int32)
        idx = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), idx.to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)

    def same_document_causal(b_idx, h_idx, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b_idx, q_idx] == document_ids[b_idx, kv_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=same_document_causal, seq_lengths=(s, s))


def dense_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids [b, s] -> bool [b, 1, s, s] (True = may attend): causal and same document."""
    s = document_ids.shape[1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (b, s, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return (same_doc & causal)[:, None]  # (b, 1, s, s): broadcast over heads


def document_mask(document_ids: torch.Tensor, *, use_flex: bool | None = None) -> torch.Tensor | BlockMask:
    """The attention mask of packed rows, in the form the fastest available path takes.

    Args:
        document_ids: [b, s] ids of the packed documents.
        use_flex: ``True`` a flex ``BlockMask``, ``False`` a dense bool mask; ``None`` (the
            model's choice): flex on CUDA unless ``TUNELAB_PACKED_ATTENTION=sdpa``.

    Returns:
        A :func:`document_block_mask` or a :func:`dense_document_mask`.
    """
    if use_flex is None:
        use_flex = document_ids.is_cuda and packed_attention() == "flex"
    return document_block_mask(document_ids) if use_flex else dense_document_mask(document_ids)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Attention with a learned sink logit per head (gpt-oss): each query's softmax runs over
    its keys plus one extra logit ``sinks[h]`` whose probability is dropped, so a head can
    attend to nothing.

    SDPA has no sinks, so the sink becomes one more key that every query sees, with a zero
    value: the head dim grows by one column (padded to 8 for the fused kernels), 1 / scale in
    the sink key and 0 in the others, ``sinks[h]`` in every query of head h, so the sink key
    scores exactly ``sinks[h]`` and the real keys score as before. The scores are never
    materialised by this code (O(s) extra memory: the padded q/k/v copies), and the causal
    case needs no mask tensor: the sink key goes first and SDPA's lower-right causal bias lets
    query i see it and keys 0..i.

    Args:
        q: [b, nh, s, hd]; k, v: [b, nkv, s_kv, hd].
        sinks: [nh].
        mask: bool, True = may attend, broadcastable to [b, nh, s, s_kv]; None = causal
            (aligned to the last key when s < s_kv).
        scale: the query scaling (None: ``head_dim ** -0.5``).

    Returns:
        [b, nh, s, hd].
    """
    b, nh, s, hd = q.shape
    nkv, s_kv = k.shape[1], k.shape[2]
    scale = hd ** -0.5 if scale is None else scale
    extra = _SINK_COLUMNS
    sink_column = sinks.to(q.dtype).view(1, nh, 1, 1).expand(b, nh, s, 1)
    q = torch.cat([q, sink_column, q.new_zeros(b, nh, s, extra - 1)], dim=-1)  # (b, nh, s, hd + extra)
    sink_key = torch.zeros(hd + extra, dtype=k.dtype, device=k.device)
    sink_key[hd] = 1 / scale
    k = torch.cat([sink_key.expand(b, nkv, 1, hd + extra), F.pad(k, (0, extra))], dim=2)  # (b, nkv, 1 + s_kv, .)
    v = torch.cat([v.new_zeros(b, nkv, 1, hd + extra), F.pad(v, (0, extra))], dim=2)
    k, v = _expand_kv(k, v, nh // nkv)
    if mask is None:
        from torch.nn.attention.bias import causal_lower_right  # (imports torch._dynamo: only when used)

        mask = causal_lower_right(s, 1 + s_kv)
    else:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)  # the sink key: always seen
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :hd]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
           gqa: bool = False, scale: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [b, nh, s, hd] over k/v [b, nkv, s_kv, hd] by the kernel ``mask`` picks
    (see the module docstring): None causal SDPA, a ``BlockMask`` flex_attention, a bool
    tensor (True = may attend, broadcastable to [b, nh, s, s_kv]) masked SDPA. ``gqa`` as in
    :func:`causal_attention`; ``scale`` the query scaling (None: ``head_dim ** -0.5``);
    ``sinks`` [nh] per-head sink logits (:func:`sink_attention`). Returns [b, nh, s, hd]."""
    if sinks is not None:
        if isinstance(mask, BlockMask):
            raise ValueError("attention sinks run on a dense mask, not a flex BlockMask")
        return sink_attention(q, k, v, sinks, mask, scale)
    if mask is None:
        return causal_attention(q, k, v, gqa=gqa, scale=scale)
    if isinstance(mask, BlockMask):
        return flex_document_attention(q, k, v, mask, scale=scale)
    k, v = _expand_kv(k, v, q.shape[1] // k.shape[1])  # (b, nh, s_kv, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def window_mask(s: int, window: int, device, document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mask of a sliding-window layer over ``s`` positions: query i sees key j iff
    ``i - window < j <= i`` (transformers' convention: ``window`` keys, itself included) and,
    with ``document_ids`` [b, s], both are in the same document. None when the window covers
    every position and there are no documents (plain causal attention is the same).

    Returns:
        bool [1 or b, 1, s, s] (True = may attend), or None.
    """
    if document_ids is None and s <= window:
        return None
    i = torch.arange(s, device=device)
    near = i[:, None] - i[None, :] < window  # (s, s)
    if document_ids is None:
        return (near & torch.ones(s, s, dtype=torch.bool, device=device).tril())[None, None]
    return dense_document_mask(document_ids) & near[None, None]


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | BlockMask | None, q_norm: nn.Module | None = None,
                   k_norm: nn.Module | None = None, scale: float | None = None,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(Per-head q/k norms,) RoPE on q/k, then :func:`attend` with grouped-query k/v as they are:
    the piece of a layer kept for checkpointing's rerun (its saved tensors are then q, k, v,
    what the norms save, and the output)."""
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rope(q, k, cos, sin)
    return attend(q, k, v, mask, gqa=True, scale=scale, sinks=sinks)


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

    q/k/v/o projections are plain ``nn.Linear`` attributes (LoRA swaps them by leaf name), without
    bias unless ``qkv_bias``. ``mask`` picks the kernel (see the module docstring): None is causal attention
    through SDPA under the ``TUNELAB_SDPA_BACKEND`` policy, a flex ``BlockMask`` runs
    flex_attention, a boolean tensor (True = may attend) runs SDPA with that mask.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads.
        head_dim: size of one head (``n_heads * head_dim`` need not equal ``dim``).
        qk_norm: an RMSNorm over each head of q and of k (``q_norm``, ``k_norm``, weights
            [head_dim]) before RoPE, as Qwen3 has; ``None`` (Llama) for none, else its eps.
        qkv_bias: biases on the q, k and v projections (Qwen2); o_proj never has one.
        sliding_window: this layer attends over the last ``sliding_window`` positions only
            (Mistral v0.1, Gemma 3's local layers); the decoder hands it the matching mask.
        scale: the query scaling (Gemma 3: ``query_pre_attn_scalar ** -0.5``); None is
            ``head_dim ** -0.5``.
        norm_plus_one: the q/k norms are Gemma's (``1 + weight``).
        fused_qkv: one ``qkv_proj`` ([q; k; v] rows, Phi-3) instead of three projections, so
            LoRA on it is one adapter over the fused matrix, as PEFT puts it.
        o_bias: a bias on the output projection too (gpt-oss).
        sinks: a learned sink logit per head (``sinks`` [n_heads], gpt-oss; see
            :func:`sink_attention`).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: float | None = None,
                 qkv_bias: bool = False, sliding_window: int | None = None, scale: float | None = None,
                 norm_plus_one: bool = False, fused_qkv: bool = False, o_bias: bool = False,
                 sinks: bool = False) -> None:
        super().__init__()
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.scale = scale
        if fused_qkv:
            self.qkv_proj = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.fused_qkv = fused_qkv
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=o_bias)
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        self.q_norm = RMSNorm(head_dim, eps=qk_norm, plus_one=norm_plus_one) if qk_norm is not None else None
        self.k_norm = RMSNorm(head_dim, eps=qk_norm, plus_one=norm_plus_one) if qk_norm is not None else None
        self.kv_cache: KVCache | None = None
        sdpa_policy()  # a bad TUNELAB_SDPA_BACKEND fails when the model is built, not mid-step

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        input_pos: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [b, s, dim], cos/sin [b, s, head_dim], mask None (causal), a ``BlockMask`` for
        [b, 1, s, s] or bool broadcastable to [b, n_heads, s, s_kv], input_pos [s] (only with a
        KV cache) -> [b, s, dim]; ``residual`` [b, s, dim], if given, is added to the result
        (inside the output projection's GEMMs where it is a fused LoRA layer)."""
        b, s, _ = x.shape
        keep = self.kv_cache is None and keeps_regions()
        # one LoRA node when all three are adapted; a rerun that replays the kept attention below
        # reads none of q/k/v (their GEMMs are skipped, the projection's saved input refilled)
        unread = keep and is_recomputing()
        if self.fused_qkv:
            (qkv,) = project(x, self.qkv_proj, unread=unread)  # [q; k; v] along the last dim
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                 self.n_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj, unread=unread)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # (b, nh, s, hd)
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (b, nkv, s, hd)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if keep:
            # q/k norms, RoPE + attention kept, not recomputed: their saved tensors are offloaded
            # in the forward, and checkpointing's rerun gets the output back (modules.recompute)
            out = kept(rope_attention, q, k, v, cos, sin, mask, self.q_norm, self.k_norm, self.scale, self.sinks)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)  # per head, over hd
            q, k = apply_rope(q, k, cos, sin)
            if self.kv_cache is not None:
                if input_pos is None:
                    raise ValueError("input_pos is required when KV caches are set up")
                k, v = self.kv_cache.update(input_pos, k, v)  # (b, nkv, max_seq_len, hd)
            out = attend(q, k, v, mask, scale=self.scale, sinks=self.sinks)  # (b, nh, s, hd)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)  # (b, s, nh*hd)
        return self.o_proj(out) if residual is None else project_onto(out, self.o_proj, residual)
