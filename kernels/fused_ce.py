"""Fused output projection + cross-entropy that never materialises the full fp32 logits.

``loss_sum(hidden, weight, labels)`` = ``sum_i CE(hidden_i @ weight^T, labels_i)`` over the
tokens whose label is not ``ignore_index``. It returns the SUM (fp32, 0-dim); the recipe divides
by the number of label tokens in the whole optimizer step, so gradient accumulation is exact
whatever the split of tokens between micro-batches.

How: tokens are processed in chunks of ``chunk_size`` rows. For each chunk the logits
``h @ W^T`` are computed in the compute dtype (bf16 in training), then one Triton program per row
computes the fp32 log-sum-exp, the row's loss and, in place over the logits buffer, the
gradient ``softmax - onehot`` (zero for ignored rows). Two matmuls then turn it into the chunk's
``grad_hidden = dlogits @ W`` (and ``grad_W += dlogits^T @ h`` only if W requires grad). The
gradients are stored during the forward and scaled by the incoming gradient in the backward, so
the peak extra memory is one [chunk, vocab] logits buffer instead of [tokens, vocab] logits plus
their fp32 copy, softmax and gradient (2 x 2048 x 128256 fp32 = 2 GiB for the 8B workload).

Numerics equal ``F.cross_entropy(F.linear(h, W).float(), labels, reduction="sum")``: logits are
rounded to the compute dtype exactly as that reference does, softmax statistics are fp32; the
gradient of the logits is rounded to the compute dtype once before the matmuls, as autograd of
the reference does.

Caveat for callers: ``weight`` must be the whole output head. If the model's ``output`` layer has
a LoRA adapter (or is quantized), ``hidden @ output.weight^T`` is not its logits; the native
model's ``output_weight`` property refuses in that case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "loss_sum",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "LinearCrossEntropyFunction",
]

# Bytes of one chunk's logits buffer: 256 MiB keeps the 8B lean profile's workspace small
# (1024 tokens x 128256 vocab in bf16) while each chunk's matmuls still fill an H200.
_CHUNK_BYTES = 256 * 2**20


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """PyTorch reference: full logits in the compute dtype, fp32 cross-entropy, sum reduction."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)  # (tokens, vocab)
    return F.cross_entropy(
        logits.float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def default_chunk_size(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one chunk's logits take about 256 MiB (256 to 8192 tokens)."""
    rows = _CHUNK_BYTES // (vocab_size * torch.empty((), dtype=dtype).element_size())
    return int(min(max(rows // 256 * 256, 256), 8192))


if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(
        LOGITS, stride_row, LABELS, LOSS, n_cols, ignore_index,
        COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_row
        label = tl.load(LABELS + row).to(tl.int64)
        ignored = label == ignore_index

        # Pass 1: online max and sum of exponentials in fp32.
        m = float("-inf")
        acc = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(acc)

        safe_label = tl.where(ignored, 0, label)
        target = tl.load(ptr + safe_label).to(tl.float32)
        tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))

        if COMPUTE_GRAD:
            # Pass 2: overwrite the logits with d(loss)/d(logits) = softmax - onehot.
            keep = tl.where(ignored, 0.0, 1.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                col_mask = cols < n_cols
                x = tl.load(ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(cols == label, p - 1.0, p) * keep
                tl.store(ptr + cols, p.to(LOGITS.dtype.element_ty), mask=col_mask)


def _ce_rows_triton(logits, labels, ignore_index: int, compute_grad: bool) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(n_cols), 4096)
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), labels, loss, n_cols, ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return loss


def _ce_rows_torch(logits, labels, ignore_index: int, compute_grad: bool) -> torch.Tensor:
    """Same contract as the Triton kernel, in PyTorch (used where Triton cannot run)."""
    lf = logits.float()  # (c, vocab): one chunk only
    lse = torch.logsumexp(lf, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - lf.gather(1, safe[:, None])[:, 0], 0.0)
    if compute_grad:
        p = torch.exp(lf - lse[:, None])
        p.scatter_add_(1, safe[:, None], -valid[:, None].float())
        logits.copy_(p * valid[:, None])
    return loss


def _chunked_pass(hidden, weight, labels, ignore_index, chunk_size, grad_h_out, grad_w_out):
    """Per-token losses [n] (fp32) over all chunks; fills grad_h_out / grad_w_out (unscaled) when given."""
    n = hidden.shape[0]
    compute_grad = grad_h_out is not None or grad_w_out is not None
    rows_fn = _ce_rows_triton if (HAS_TRITON and use_triton(hidden)) else _ce_rows_torch
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]  # (c, dim)
        logits = h @ weight.t()  # (c, vocab) in the compute dtype
        losses[start:end] = rows_fn(logits, labels[start:end], ignore_index, compute_grad)
        # `logits` now holds d(loss)/d(logits) for this chunk.
        if grad_h_out is not None:
            torch.mm(logits, weight, out=grad_h_out[start:end])  # (c, vocab) @ (vocab, dim)
        if grad_w_out is not None:
            grad_w_out += (logits.t() @ h).float()  # (vocab, c) @ (c, dim), fp32 accumulation
    return losses


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy; gradients computed in the forward pass.

    ``per_token=False`` returns the sum (0-dim); ``per_token=True`` returns the [n] losses, whose
    incoming gradient scales each row of the stored ``grad_hidden`` (each row of it depends on
    its own token only), so the head weight must then be frozen.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int, per_token: bool = False):
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        losses = _chunked_pass(hidden, weight, labels, ignore_index, chunk_size, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.per_token = weight.dtype, per_token
        return losses if per_token else losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if ctx.per_token:  # grad_loss [n]: one scale per token row
            grad_loss = grad_loss[:, None]
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Chunked ``sum CE(hidden @ weight^T, labels)`` (always chunked; the per-row softmax runs in
    Triton where ``tunelab.kernels`` would use Triton for ``hidden``, in PyTorch otherwise).

    Args:
        hidden: final-normed hidden states [..., dim].
        weight: output head [vocab, dim], same dtype as ``hidden``.
        labels: int targets [...] (pre-shifted; ``ignore_index`` where not trained on).
        ignore_index: label value that contributes no loss and no gradient.
        chunk_size: tokens per chunk (default: about 256 MiB of logits per chunk).
        reduction: ``"sum"``, or ``"none"`` for the per-token losses (0 where ignored); with
            ``"none"`` under autograd only ``hidden`` may require grad (a frozen head, as in
            LoRA), since the head's gradient is only stored summed over tokens.

    Returns:
        fp32: 0-dim sum over non-ignored labels, or [tokens] losses with ``reduction="none"``.
    """
    dim = hidden.shape[-1]
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape[:-1])}")
    h2 = hidden.reshape(-1, dim)
    h2 = h2 if h2.is_contiguous() else h2.contiguous()
    y = labels.reshape(-1)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.dtype)
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    per_token = reduction == "none"
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            losses = _chunked_pass(h2, weight, y, ignore_index, chunk, None, None)
        return losses if per_token else losses.sum()
    if per_token and weight.requires_grad:
        raise ValueError("reduction='none' needs a frozen head (weight.requires_grad=False)")
    return LinearCrossEntropyFunction.apply(h2, weight, y, ignore_index, chunk, per_token)


def loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight^T`` against ``labels`` (the recipe's
    loss): fused and chunked on CUDA, the full-logits PyTorch reference elsewhere.

    Args:
        hidden: final-normed hidden states [b, s, dim] (``model(tokens, return_hidden=True)``).
        weight: the output head [vocab, dim] (``model.output_weight``).
        labels: pre-shifted targets [b, s], ``ignore_index`` where not trained on.
        ignore_index: label value to skip.
        chunk_size: tokens per chunk on the fused path (default from the vocab size).

    Returns:
        fp32 0-dim tensor: the SUM over non-ignored tokens. Divide by the number of label
        tokens of the whole optimizer step (not of the micro-batch) for the mean.
    """
    if use_triton(hidden):
        return fused_linear_cross_entropy(
            hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size
        )
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index)
