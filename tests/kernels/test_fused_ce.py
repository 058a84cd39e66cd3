"""Fused chunked linear + cross-entropy vs F.cross_entropy on the full logits (sum reduction).

fp32 tolerance 1e-5 relative / 1e-5 absolute: the logits matmul is the same cuBLAS/CPU call
per chunk, then log-sum-exp and softmax are fp32 in both, in a different summation order over
the vocabulary (values O(1); a wrong term or a missed row is off by O(1)).
bf16: conftest ``assert_bf16_close``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.kernels import backend, fused_linear_cross_entropy, linear_cross_entropy_reference, loss_sum
from tunelab.kernels.fused_ce import default_chunk_size

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(n, dim, vocab, dtype, device, seed=0, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5 * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(w_grad), labels


def _run(fn, hidden, weight, labels, scale=1.0, **kw):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(weight.requires_grad)
    loss = fn(hidden, weight, labels, **kw)
    inputs = (hidden, weight) if weight.requires_grad else (hidden,)
    grads = torch.autograd.grad(loss * scale, inputs)
    return (loss, *grads)


def _oracle(hidden, weight, labels, **_):
    """F.cross_entropy on the full logits, computed independently of the kernel module."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("vocab", [103, 5000])  # 5000 > one 4096-wide block: the loop over blocks
def test_fp32_matches_full_logits(device, vocab):
    hidden, weight, labels = _inputs(37, 24, vocab, torch.float32, device)
    labels[8:16] = -100  # chunk 1 (of 8 rows) is entirely ignored
    labels[[3, 30]] = -100  # and scattered ignored rows; 37 = 4 full chunks + a tail of 5
    with backend("triton"):
        ours = _run(fused_linear_cross_entropy, hidden, weight, labels, scale=1.7, chunk_size=8)
    ref = _run(_oracle, hidden, weight, labels, scale=1.7)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_frozen_weight_gets_no_gradient(device):
    hidden, weight, labels = _inputs(20, 16, 50, torch.float32, device, seed=1, w_grad=False)
    with backend("triton"):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=6)
    loss.backward()
    assert weight.grad is None
    ref_h = hidden.detach().requires_grad_()
    _oracle(ref_h, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad, **TOL)


def test_all_ignored_gives_zero_loss_and_grads(device):
    hidden, weight, labels = _inputs(9, 8, 30, torch.float32, device, seed=2)
    labels[:] = -100
    with backend("triton"):
        loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, labels, chunk_size=4)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_batched_input_no_grad_and_accumulation(device):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 11, 16, generator=g).to(device)
    weight = torch.randn(70, 16, generator=g).to(device)
    labels = torch.randint(0, 70, (2, 11), generator=g).to(device)
    labels[1, 5:] = -100
    ref = _oracle(hidden.reshape(-1, 16), weight, labels.reshape(-1))
    with backend("triton"), torch.no_grad():
        whole = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=5)
        # Two micro-batches: sums add up exactly to the whole batch's sum.
        parts = sum(fused_linear_cross_entropy(hidden[i : i + 1], weight, labels[i : i + 1]) for i in range(2))
    torch.testing.assert_close(whole, ref, **TOL)
    torch.testing.assert_close(parts, ref, **TOL)


def test_bf16_within_bf16_noise(device, assert_bf16_close):
    hidden, weight, labels = _inputs(40, 32, 300, torch.bfloat16, device, seed=4)
    labels[::7] = -100
    with backend("triton"):
        ours = _run(fused_linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    low = _run(_oracle, hidden, weight, labels)
    truth = _run(_oracle, hidden.double(), weight.double(), labels)
    assert ours[0].dtype == torch.float32
    for name, a, b, t in zip(["loss", "dhidden", "dweight"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_real_size_bf16_on_gpu(device, assert_bf16_close):
    if device != "cuda":
        pytest.skip("8B-size check runs on the GPU only")
    hidden, weight, labels = _inputs(2048, 4096, 128256, torch.bfloat16, device, seed=5, w_grad=False)
    labels[:100] = -100
    with backend("triton"):
        ours = _run(fused_linear_cross_entropy, hidden, weight, labels)
    low = _run(_oracle, hidden, weight, labels)
    truth = _run(_oracle, hidden.double(), weight.double(), labels)
    for name, a, b, t in zip(["loss", "dhidden"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_torch_chunked_path_matches_full_logits():
    """Where Triton cannot run, fused_linear_cross_entropy still chunks, in PyTorch."""
    hidden, weight, labels = _inputs(29, 12, 40, torch.float32, "cpu", seed=6)
    labels[5:12] = -100
    with backend("reference"):
        ours = _run(fused_linear_cross_entropy, hidden, weight, labels, scale=0.3, chunk_size=7)
    ref = _run(_oracle, hidden, weight, labels, scale=0.3)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_loss_sum_dispatch_and_reference():
    hidden, weight, labels = _inputs(10, 8, 20, torch.float32, "cpu", seed=7)
    labels[2] = -100
    with backend("reference"):
        assert torch.equal(loss_sum(hidden, weight, labels), linear_cross_entropy_reference(hidden, weight, labels))
    torch.testing.assert_close(linear_cross_entropy_reference(hidden, weight, labels), _oracle(hidden, weight, labels))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_per_token_losses_and_row_weighted_gradient(device, kernel):
    """reduction='none' (DPO's per-token log-probs): each token's loss equals
    F.cross_entropy(reduction='none') and a different weight per token (the sequence sums of
    the DPO loss) reaches grad_hidden row by row. The head is frozen, as LoRA keeps it."""
    if kernel == "reference" and device != "cpu":
        pytest.skip("the PyTorch rows path is checked on CPU")
    hidden, weight, labels = _inputs(23, 16, 90, torch.float32, device, seed=8, w_grad=False)
    labels[4:9] = -100
    row_w = torch.randn(23, generator=torch.Generator().manual_seed(9)).to(device)
    with backend(kernel):
        ours = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=6, reduction="none")
    ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(ours, ref, **TOL)
    (g_ours,) = torch.autograd.grad((ours * row_w).sum(), hidden)
    (g_ref,) = torch.autograd.grad((ref * row_w).sum(), hidden)
    torch.testing.assert_close(g_ours, g_ref, **TOL)
    with backend(kernel), torch.no_grad():  # no autograd: the same values, nothing stored
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels, reduction="none"), ref, **TOL)


def test_per_token_refuses_a_trainable_head_and_unknown_reduction():
    hidden, weight, labels = _inputs(6, 8, 12, torch.float32, "cpu", seed=10)
    with pytest.raises(ValueError, match="frozen head"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")


def test_label_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


def test_default_chunk_size():
    assert default_chunk_size(128256, torch.bfloat16) == 1024  # 256 MiB of logits per chunk
    assert default_chunk_size(1024, torch.float32) == 8192
    assert default_chunk_size(10**7, torch.float32) == 256


def test_dpo_sequence_log_probs_fused_equals_checkpointed_chunks(device):
    """sequence_log_probs_from_hidden with output_weight (the fused per-token path where Triton
    runs) gives the checkpointed-chunk path's sums and hidden gradient (fp32, TOL above)."""
    from tunelab.modules.loss import sequence_log_probs_from_hidden

    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 9, 16, generator=g).to(device).requires_grad_()
    weight = torch.randn(60, 16, generator=g).to(device) / 4
    labels = torch.randint(0, 60, (4, 9), generator=g).to(device)
    labels[:, :3] = -100  # the prompt
    labels[2, 7:] = -100  # padding

    def run(**kw):
        sums, counts = sequence_log_probs_from_hidden(hidden, labels, lambda h: F.linear(h, weight), chunk_size=5, **kw)
        (grad,) = torch.autograd.grad((sums * torch.arange(1.0, 5.0, device=device)).sum(), hidden)
        return sums, counts, grad

    with backend("triton"):
        fused = run(output_weight=weight)
    chunked = run()
    for a, b in zip(fused, chunked):
        torch.testing.assert_close(a, b, **TOL)
