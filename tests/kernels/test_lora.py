"""LoRA autograd function vs autograd of the PyTorch reference, and its hook in LoRALinear.

The function is torch-level (cuBLAS/CPU matmuls, no Triton kernel), so these tests run in the
main process on CPU. fp32 tolerance 1e-5: the same products summed in a different grouping
(addmm of the update vs a separate add). bf16: conftest ``assert_bf16_close``.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import HAS_TRITON, backend, lora_linear, lora_linear_reference
from tunelab.kernels.lora import LoRALinearFunction
from tunelab.modules.peft import LoRALinear

TOL = dict(rtol=1e-5, atol=1e-5)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="backend 'triton' needs the triton package")


def _inputs(n, d_in, d_out, r, dtype, adapter_dtype, seed=0, w_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d_in, generator=g).to(DEVICE, dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(DEVICE, dtype).requires_grad_(w_grad)
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(DEVICE, adapter_dtype)
    b = torch.randn(d_out, r, generator=g).to(DEVICE, adapter_dtype)  # non-zero B: test every term
    dy = torch.randn(2, n, d_out, generator=g).to(DEVICE, dtype)
    return x, w, a, b, dy


def _run(fn, x, w, a, b, dy, scaling=2.0):
    x = x.detach().requires_grad_()
    if isinstance(w, torch.Tensor):  # else a function giving the base weight
        w = w.detach().requires_grad_(w.requires_grad)
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(x, w, a, b, scaling)
    inputs = [x, a, b] + ([w] if isinstance(w, torch.Tensor) and w.requires_grad else [])
    return (y, *torch.autograd.grad(y, inputs, dy))


@pytest.mark.parametrize("w_grad", [False, True])
def test_fp32_matches_reference(w_grad):
    args = _inputs(7, 24, 40, 4, torch.float32, torch.float32, w_grad=w_grad)
    ours = _run(LoRALinearFunction.apply, *args)
    ref = _run(lora_linear_reference, *args)
    assert len(ours) == (5 if w_grad else 4)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bf16_base_within_bf16_noise(adapter_dtype, assert_bf16_close):
    args = _inputs(9, 64, 48, 8, torch.bfloat16, adapter_dtype, seed=1)
    ours = _run(LoRALinearFunction.apply, *args)
    low = _run(lora_linear_reference, *args)
    truth = _run(lora_linear_reference, *(t.double().requires_grad_(t.requires_grad) for t in args))
    for name, a, b, t in zip(["y", "dx", "dA", "dB"], ours, low, truth):
        assert a.dtype == b.dtype
        assert_bf16_close(a, b, t, name)


def test_saves_only_x_and_xa():
    """Besides the weights (parameters, not copies), the graph keeps x and the [N, r] x A^T."""
    x, w, a, b, _ = _inputs(5, 16, 12, 3, torch.float32, torch.float32, seed=2)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LoRALinearFunction.apply(x, w, a, b, 1.0)
    weights = {w.data_ptr(), a.data_ptr(), b.data_ptr()}
    activations = sorted(t.numel() for t in saved if t.data_ptr() not in weights)
    assert activations == [2 * 5 * 3, 2 * 5 * 16]  # x A^T and x


def test_function_base_matches_dense_and_is_never_saved():
    """A base given as ``dtype -> W0`` (a quantized layer) gives the dense base's outputs and
    gradients; it is called once in the forward and once in the backward, and no weight-sized
    tensor is saved (the reference path too)."""
    x, w, a, b, dy = _inputs(6, 20, 28, 4, torch.float32, torch.float32, seed=4)
    calls = []

    def base(dtype):
        calls.append(dtype)
        return w.to(dtype)

    for fn in (LoRALinearFunction.apply, lora_linear_reference):
        calls.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            got = _run(fn, x, base, a, b, dy)
        want = _run(fn, x, w, a, b, dy)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, **TOL)
        assert calls == [torch.float32, torch.float32], fn
        assert all(t.numel() != w.numel() for t in saved), fn


def _module(dropout=0.0, seed=3):
    torch.manual_seed(seed)
    m = LoRALinear(24, 40, rank=4, alpha=8, dropout=dropout).to(DEVICE)
    torch.nn.init.normal_(m.lora_b.weight)  # a trained-looking adapter, not the zero init
    return m


@needs_triton
def test_module_hook_matches_unfused_module():
    m = _module()
    x = torch.randn(3, 5, 24, device=DEVICE)
    outs = {}
    for name in ("triton", "reference"):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        with backend(name):
            y = m(xi)
        y.square().sum().backward()
        outs[name] = (y, xi.grad, m.lora_a.weight.grad, m.lora_b.weight.grad)
        if name == "triton":
            assert "LoRALinearFunction" in type(y.grad_fn).__name__
    assert m.weight.grad is None  # frozen base: no gradient computed
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, **TOL)


@needs_triton
def test_module_hook_falls_back_for_dropout_and_disabled():
    m = _module(dropout=0.1).train()
    x = torch.randn(2, 24, device=DEVICE)
    with backend("triton"):
        assert "LoRALinearFunction" not in type(m(x.requires_grad_()).grad_fn).__name__
        m.eval()  # dropout inactive: the fused path applies again
        assert "LoRALinearFunction" in type(m(x).grad_fn).__name__
        m.disabled = True
        torch.testing.assert_close(m(x), x @ m.weight.t())


def test_dispatch_reference_on_cpu():
    args = _inputs(3, 8, 6, 2, torch.float32, torch.float32, seed=4)
    with backend("reference"):
        assert torch.equal(lora_linear(*args[:4], 2.0), lora_linear_reference(*args[:4], 2.0))


def test_mm_plus_low_rank_op_passes_opcheck():
    """The custom op that keeps the LoRA update in place under torch.compile: schema, fake
    (meta) implementation and autograd registration consistent (torch.library.opcheck)."""
    from tunelab.kernels.lora import _mm_plus_low_rank_op

    g = torch.Generator().manual_seed(5)
    m1, m2 = torch.randn(6, 10, generator=g), torch.randn(10, 7, generator=g)
    l1, l2 = torch.randn(6, 3, generator=g), torch.randn(3, 7, generator=g)
    torch.library.opcheck(_mm_plus_low_rank_op, (m1, m2, l1, l2, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_mm_plus_low_rank_op(m1, m2, l1, l2, 0.5), m1 @ m2 + 0.5 * l1 @ l2, **TOL)


@needs_triton
def test_compiled_module_keeps_the_update_in_place_and_matches_eager(graph_recorder):
    """torch.compile of a LoRA layer (fullgraph: no graph break) runs the custom op in forward
    and backward and gives the eager numbers."""
    record, graphs = graph_recorder
    m = _module(seed=6)
    x = torch.randn(2, 5, 24, device=DEVICE)
    outs = {}
    for name in ("eager", "compiled"):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        fn = torch.compile(m, fullgraph=True, backend=record) if name == "compiled" else m
        with backend("triton"):
            y = fn(xi)
            y.square().sum().backward()
        outs[name] = (y, xi.grad, m.lora_a.weight.grad, m.lora_b.weight.grad)
    for a, b in zip(outs["compiled"], outs["eager"]):
        torch.testing.assert_close(a, b, **TOL)
    for kind in ("forward", "backward"):
        targets = graphs[kind]
        assert any("mm_plus_low_rank" in t for t in targets), (kind, targets)
        assert not any("addmm" in t for t in targets), (kind, targets)  # no functionalized copy + addmm
