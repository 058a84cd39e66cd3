"""The LoRA SwiGLU MLP node (gate / up updates inside the SwiGLU kernels) vs the PyTorch reference.

Runs where the Triton kernels run (CUDA, or CPU under TRITON_INTERPRET=1: test_interpreter.py).
fp32 tolerance 1e-5: the same products; the updates are added to the base products in fp32
registers instead of after a rounding store, and the input gradient is summed in one buffer.
bf16: conftest ``assert_bf16_close``.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import backend
from tunelab.kernels.lora_mlp import MAX_RANK, LoRASwiGLUFunction, lora_swiglu, lora_swiglu_reference

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(device, dtype=torch.float32, adapter_dtype=None, n=9, dim=24, hidden=200, ranks=(8, 4, 6), seed=0):
    """x [2, n, dim], bases gate/up/down, A's, non-zero B's (every term tested), d out."""
    adapter_dtype = adapter_dtype or dtype
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt)

    x = rand(2, n, dim)
    ws = [rand(hidden, dim, scale=dim**-0.5), rand(hidden, dim, scale=dim**-0.5), rand(dim, hidden, scale=hidden**-0.5)]
    ins = (dim, dim, hidden)
    outs = (hidden, hidden, dim)
    As = [rand(r, i, scale=i**-0.5, dt=adapter_dtype) for r, i in zip(ranks, ins)]
    Bs = [rand(o, r, scale=0.5, dt=adapter_dtype) for r, o in zip(ranks, outs)]
    dy = rand(2, n, dim)
    return x, ws, As, Bs, dy


def _grads(fn, x, ws, As, Bs, dy, scalings=(2.0, 0.5, 1.5)):
    x = x.detach().requires_grad_()
    As = [a.detach().requires_grad_() for a in As]
    Bs = [b.detach().requires_grad_() for b in Bs]
    y = fn(x, ws, As, Bs, list(scalings))
    return [y, *torch.autograd.grad(y, [x, *As, *Bs], dy)]


def _fused(compute_output=True, residual=None):
    return lambda x, ws, As, Bs, s: LoRASwiGLUFunction.apply(x, tuple(s), compute_output, residual, *ws, *As, *Bs)


@pytest.mark.parametrize("base", ["dense", "function"])
def test_fp32_matches_reference(device, base):
    """Output, input gradient and all six adapter gradients; odd sizes (hidden 200 is not a
    multiple of the 128-wide tiles, 18 tokens not of 64) and three different ranks below the
    16 the in-kernel product pads to. A base given as a function (QLoRA) is rebuilt once in the
    forward and once in the backward."""
    x, ws, As, Bs, dy = _inputs(device)
    calls = []

    def as_fn(w):
        def fn(dtype):
            calls.append(tuple(w.shape))
            return w.to(dtype)
        return fn

    bases = ws if base == "dense" else [as_fn(w) for w in ws]
    ours = _grads(_fused(), x, bases, As, Bs, dy)
    ref = _grads(lora_swiglu_reference, x, ws, As, Bs, dy)
    for name, a, b in zip(["y", "dx", "dAg", "dAu", "dAd", "dBg", "dBu", "dBd"], ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    if base == "function":
        assert len(calls) == 6, calls


def test_skipped_output_gives_the_same_gradients(device):
    """compute_output=False (a checkpoint recompute): the down base GEMM is skipped, the
    gradients are those of the computing call."""
    x, ws, As, Bs, dy = _inputs(device, seed=1)
    ours = _grads(_fused(compute_output=False), x, ws, As, Bs, dy)[1:]
    ref = _grads(_fused(), x, ws, As, Bs, dy)[1:]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_residual_is_added_inside_and_gets_the_output_gradient(device):
    """``residual`` (the residual stream) is added by the down GEMMs: output = reference +
    residual, the residual's gradient is d out, every other gradient is unchanged (fp32 1e-5)."""
    x, ws, As, Bs, dy = _inputs(device, seed=6)
    residual = torch.randn(dy.shape, generator=torch.Generator().manual_seed(7)).to(device).requires_grad_()
    y = lora_swiglu(x, ws, As, Bs, [2.0, 0.5, 1.5], residual=residual)
    with backend("triton"):
        ours = lora_swiglu(x, ws, As, Bs, [2.0, 0.5, 1.5], residual=residual)
    assert "LoRASwiGLU" in type(ours.grad_fn).__name__
    torch.testing.assert_close(ours, y, **TOL)
    (grad,) = torch.autograd.grad(ours, [residual], dy)
    torch.testing.assert_close(grad, dy, rtol=0, atol=0)
    with_res = _grads(_fused(residual=residual.detach()), x, ws, As, Bs, dy)
    without = _grads(_fused(), x, ws, As, Bs, dy)
    torch.testing.assert_close(with_res[0], without[0] + residual.detach(), **TOL)
    for a, b in zip(with_res[1:], without[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bf16_within_bf16_noise(device, adapter_dtype, assert_bf16_close):
    x, ws, As, Bs, dy = _inputs(device, torch.bfloat16, adapter_dtype, n=40, dim=64, hidden=160, ranks=(16, 16, 16),
                                seed=2)
    ours = _grads(_fused(), x, ws, As, Bs, dy)
    low = _grads(lora_swiglu_reference, x, ws, As, Bs, dy)
    truth = _grads(lora_swiglu_reference, x.double(), [w.double() for w in ws], [a.double() for a in As],
                   [b.double() for b in Bs], dy.double())
    for name, a, b, t in zip(["y", "dx", "dAg", "dAu", "dAd", "dBg", "dBu", "dBd"], ours, low, truth):
        assert a.dtype == b.dtype, name
        assert_bf16_close(a, b, t, name)


def test_large_rank_takes_the_reference(device):
    x, ws, As, Bs, _ = _inputs(device, n=3, dim=16, hidden=32, ranks=(MAX_RANK + 1, 4, 4))
    with backend("triton"):
        y = lora_swiglu(x, ws, [a.requires_grad_() for a in As], Bs, [1.0, 1.0, 1.0])
    assert "LoRASwiGLU" not in type(y.grad_fn).__name__


def test_feed_forward_with_a_large_rank_keeps_its_per_projection_nodes(device):
    """Above MAX_RANK the MLP is not handed to the plain reference: gate/up still run as one
    LoRA group node (and the rest on their own fused paths)."""
    from tunelab.modules.feed_forward import FeedForward
    from tunelab.modules.peft import apply_lora
    from tunelab.modules.peft.lora import lora_mlp, project

    mlp = FeedForward(32, 96).to(device)
    apply_lora(mlp, ["gate_proj", "up_proj", "down_proj"], rank=MAX_RANK + 1, alpha=8)
    x = torch.randn(2, 3, 32, device=device)
    with backend("triton"):
        assert lora_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj) is None
        assert "LoRAGroupFunction" in type(project(x, mlp.gate_proj, mlp.up_proj)[0].grad_fn).__name__


def test_feed_forward_uses_one_node_only_when_all_three_are_adapted(device):
    """FeedForward with gate/up/down adapted runs the fused node and equals the kernels-off
    module (fp32 1e-5, gradients of every adapter); with down_proj not adapted it falls back."""
    from tunelab.modules.feed_forward import FeedForward
    from tunelab.modules.peft import apply_lora, get_adapter_params

    torch.manual_seed(3)
    for targets, fused in ((["gate_proj", "up_proj", "down_proj"], True), (["gate_proj", "up_proj"], False)):
        mlp = FeedForward(32, 96).to(device)
        apply_lora(mlp, targets, rank=4, alpha=8)
        for p in get_adapter_params(mlp).values():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 5, 32, device=device)
        results = {}
        for name in ("triton", "reference"):
            mlp.zero_grad()
            with backend(name):
                y = mlp(x)
                y.square().sum().backward()
            if name == "triton":
                assert ("LoRASwiGLU" in type(y.grad_fn).__name__) == fused
            results[name] = [y, *(p.grad.clone() for p in get_adapter_params(mlp).values())]
        for a, b in zip(results["triton"], results["reference"]):
            torch.testing.assert_close(a, b, **TOL)


def test_real_size_bf16_on_gpu(device, assert_bf16_close):
    """8B shapes (dim 4096, hidden 14336, rank 16, 2048 tokens) in bf16 against an fp32 truth."""
    if device != "cuda":
        pytest.skip("8B-size check runs on the GPU only")
    x, ws, As, Bs, dy = _inputs(device, torch.bfloat16, torch.float32, n=1024, dim=4096, hidden=14336,
                                ranks=(16, 16, 16), seed=4)
    ours = _grads(_fused(), x, ws, As, Bs, dy)
    low = _grads(lora_swiglu_reference, x, ws, As, Bs, dy)
    truth = _grads(lora_swiglu_reference, x.float(), [w.float() for w in ws], As, Bs, dy.float())
    for name, a, b, t in zip(["y", "dx", "dAg", "dAu", "dAd", "dBg", "dBu", "dBd"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_compiled_matches_eager_on_gpu(device, compiled_matches_eager):
    """torch.compile (fullgraph) of the fused MLP: the Triton kernels traced into the graph, the
    same output and gradients as eager (fp32 1e-5)."""
    if device != "cuda":
        pytest.skip("inductor compiles the Triton kernels for the GPU only")
    from tunelab.modules.feed_forward import FeedForward
    from tunelab.modules.peft import apply_lora, get_adapter_params

    torch.manual_seed(5)
    mlp = FeedForward(64, 160).to(device)
    apply_lora(mlp, ["gate_proj", "up_proj", "down_proj"], rank=8, alpha=16)
    params = list(get_adapter_params(mlp).values())
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    compiled_matches_eager(mlp, torch.randn(2, 7, 64, device=device), params, **TOL)


def test_checkpointed_compiled_model_matches_the_reference_on_gpu(device):
    """A tiny LoRA model (all linear layers adapted) with activation checkpointing and compiled
    layers, the fused MLP's rerun skipping its down GEMM: loss and adapter gradients equal the
    kernels-off eager model's (fp32; 1e-4: cuBLAS and inductor sum in other orders on the GPU)."""
    if device != "cuda":
        pytest.skip("inductor compiles the Triton kernels for the GPU only")
    from tunelab.models import build_model, tiny
    from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
    from tunelab.training.steps import wrap_layers

    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for name, compiled in (("triton", True), ("reference", False)):
        torch.manual_seed(0)
        model = build_model(tiny(vocab_size=96), device=device, dtype=torch.float32)
        apply_lora(model, "all-linear", rank=4, alpha=8)
        for p in get_adapter_params(model).values():
            torch.nn.init.normal_(p, std=0.05)
        set_trainable_params(model)
        wrap_layers(model, activation_checkpointing=True, compile_layers=compiled)
        with backend(name):
            hidden = model(tokens, return_hidden=True)
            hidden.square().mean().backward()
        results[name] = [hidden, *(p.grad for p in get_adapter_params(model).values())]
    torch._dynamo.reset()
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_ops_pass_opcheck(device):
    """The custom ops torch.compile sees (schema, fake tensors) agree with the launches."""
    from tunelab.kernels.lora_mlp import _swiglu_lora_bwd_op, _swiglu_lora_fwd_op

    g = torch.Generator().manual_seed(7)
    n, f, r = 20, 144, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    g0, u0, dh0, xa, bg, bu, gbd, ad = rand(n, f), rand(n, f), rand(n, f), rand(n, 2 * r), rand(f, r), rand(f, r), \
        rand(n, r), rand(r, f)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(_swiglu_lora_fwd_op, (g0, u0, xa, bg, bu, 2.0, 0.5), test_utils=checks)
    torch.library.opcheck(_swiglu_lora_bwd_op, (dh0, gbd, ad, g0, u0, xa, bg, bu, 2.0, 0.5), test_utils=checks)
