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


def test_residual_is_added_by_the_gemm_and_gets_the_output_gradient():
    """``residual`` (a transformer's residual stream) enters the rank-r GEMM as its C: the output
    is the reference's plus the residual (fp32 1e-5), the residual's gradient is d out exactly
    and the other gradients are those without it."""
    x, w, a, b, dy = _inputs(7, 24, 40, 4, torch.float32, torch.float32, seed=3)
    residual = torch.randn(dy.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
    ours = _run(lambda *args: LoRALinearFunction.apply(*args, True, residual), x, w, a, b, dy)
    ref = _run(lora_linear_reference, x, w, a, b, dy)
    torch.testing.assert_close(ours[0], ref[0] + residual, **TOL)
    for got, want in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(got, want, **TOL)
    y = LoRALinearFunction.apply(x, w, a, b, 2.0, True, residual)
    (grad,) = torch.autograd.grad(y, [residual], dy)
    torch.testing.assert_close(grad, dy, rtol=0, atol=0)


def test_project_onto_folds_the_residual_only_into_fused_lora_layers():
    """project_onto: a fused LoRA layer takes the residual inside its node; a plain linear (and
    the kernels-off path) adds it; all equal residual + layer(x)."""
    from tunelab.modules.peft.lora import project_onto

    torch.manual_seed(5)
    lora, plain = LoRALinear(16, 24, rank=4, alpha=8), torch.nn.Linear(16, 24, bias=False)
    torch.nn.init.normal_(lora.lora_b.weight)
    lora, plain = lora.to(DEVICE), plain.to(DEVICE)
    x, residual = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 24, device=DEVICE)
    for layer in (lora, plain):
        for name in ("triton", "reference"):
            with backend(name):
                y = project_onto(x, layer, residual)
            fused = name == "triton" and layer is lora
            assert ("LoRALinearFunction" in type(y.grad_fn).__name__) == fused
            torch.testing.assert_close(y, residual + layer(x), **TOL)


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
    c = torch.randn(6, 7, generator=g)
    for skip, residual in ((False, None), (True, None), (False, c)):
        torch.library.opcheck(_mm_plus_low_rank_op, (m1, m2, l1, l2, 0.5, skip, residual),
                              test_utils=("test_schema", "test_faketensor"))
    assert _mm_plus_low_rank_op(m1, m2, l1, l2, 0.5, True).shape == (6, 7)
    torch.testing.assert_close(_mm_plus_low_rank_op(m1, m2, l1, l2, 0.5), m1 @ m2 + 0.5 * l1 @ l2, **TOL)
    torch.testing.assert_close(_mm_plus_low_rank_op(m1, m2, l1, l2, 0.5, False, c), c + m1 @ m2 + 0.5 * l1 @ l2,
                               **TOL)


@needs_triton
def test_compiled_module_keeps_the_update_in_place_and_matches_eager(compiled_matches_eager):
    """torch.compile of a LoRA layer (fullgraph: no graph break) runs the custom op in forward
    and backward and gives the eager numbers."""
    m = _module(seed=6)
    x = torch.randn(2, 5, 24, device=DEVICE)
    graphs = compiled_matches_eager(m, x, [m.lora_a.weight, m.lora_b.weight], **TOL)
    for kind in ("forward", "backward"):
        targets = graphs[kind]
        assert any("mm_plus_low_rank" in t for t in targets), (kind, targets)
        assert not any("addmm" in t for t in targets), (kind, targets)  # no functionalized copy + addmm


def _group_inputs(dtype=torch.float32, adapter_dtype=torch.float32, seed=7, outs=(40, 16, 16), ranks=(4, 4, 8)):
    g = torch.Generator().manual_seed(seed)
    d_in = 24
    x = torch.randn(2, 5, d_in, generator=g).to(DEVICE, dtype)
    ws = [(torch.randn(o, d_in, generator=g) / d_in**0.5).to(DEVICE, dtype) for o in outs]
    As = [(torch.randn(r, d_in, generator=g) / d_in**0.5).to(DEVICE, adapter_dtype) for r in ranks]
    Bs = [torch.randn(o, r, generator=g).to(DEVICE, adapter_dtype) for o, r in zip(outs, ranks)]
    dys = [torch.randn(2, 5, o, generator=g).to(DEVICE, dtype) for o in outs]
    return x, ws, As, Bs, dys


def _group_grads(fn, x, ws, As, Bs, dys, scalings):
    x = x.detach().requires_grad_()
    As = [a.detach().requires_grad_() for a in As]
    Bs = [b.detach().requires_grad_() for b in Bs]
    ys = fn(x, ws, As, Bs, scalings)
    grads = torch.autograd.grad(ys, [x, *As, *Bs], dys)
    return [*ys, *grads]


@pytest.mark.parametrize("base", ["dense", "function"])
def test_group_function_matches_one_function_per_projection(base):
    """q/k/v-like projections of one input as one node (different ranks and scalings): outputs,
    input gradient and every adapter gradient equal the separate LoRA functions' (fp32 1e-5:
    the same products, the input gradient summed in one buffer instead of three). A base given
    as a function (QLoRA) is rebuilt in the backward right before each use."""
    from tunelab.kernels.lora import LoRAGroupFunction

    x, ws, As, Bs, dys = _group_inputs()
    scalings = [2.0, 0.5, 1.0]
    calls = []

    def as_fn(w):
        def fn(dtype):
            calls.append(w.shape)
            return w.to(dtype)
        return fn

    bases = ws if base == "dense" else [as_fn(w) for w in ws]
    fused = _group_grads(lambda x, w, a, b, s: LoRAGroupFunction.apply(x, tuple(s), True, *bases, *a, *b),
                         x, ws, As, Bs, dys, scalings)
    separate = _group_grads(lambda x, w, a, b, s: [LoRALinearFunction.apply(x, wi, ai, bi, si)
                                                   for wi, ai, bi, si in zip(w, a, b, s)], x, ws, As, Bs, dys, scalings)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, **TOL)
    if base == "function":
        assert len(calls) == 6  # each base rebuilt once forward, once backward


def test_group_function_skips_outputs_without_gradient():
    from tunelab.kernels.lora import LoRAGroupFunction

    x, ws, As, Bs, _ = _group_inputs(outs=(8, 6), ranks=(2, 2))
    x.requires_grad_()
    As = [a.requires_grad_() for a in As]
    q, k = LoRAGroupFunction.apply(x, (1.0, 1.0), True, *ws, *As, *Bs)
    gx, ga0, ga1 = torch.autograd.grad(q.sum(), [x, *As])  # k unused: its B gets no gradient
    ref_q = LoRALinearFunction.apply(x, ws[0], As[0], Bs[0], 1.0)
    rx, ra0 = torch.autograd.grad(ref_q.sum(), [x, As[0]])
    torch.testing.assert_close(gx, rx, **TOL)
    torch.testing.assert_close(ga0, ra0, **TOL)
    torch.testing.assert_close(ga1, torch.zeros_like(ga1), rtol=0, atol=0)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_and_mlp_use_one_node_and_match_the_reference(device, qkv_bias):
    """LoRA on q/k/v and gate/up: the modules' projections go through one group node each,
    and the whole checkpointed model's output and adapter gradients (its recompute skipping the
    down projections' GEMMs) equal the kernels-off reference; with Qwen2's q/k/v biases (added
    after the group node) too."""
    from tunelab.models import build_model, tiny
    from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
    from tunelab.training.steps import wrap_layers

    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=96, qkv_bias=qkv_bias), device=device, dtype=torch.float32)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=4, alpha=8)
    for p in get_adapter_params(model).values():
        torch.nn.init.normal_(p, std=0.05)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=True, compile_layers=False)  # with the recompute's skipped GEMM
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for name in ("triton", "reference"):
        model.zero_grad()
        with backend(name):
            hidden = model(tokens, return_hidden=True)
            if name == "triton":
                x = torch.randn(2, 12, model.args.dim, device=device, requires_grad=True)
                q, k, v = model.layers[0].attn.q_proj, model.layers[0].attn.k_proj, model.layers[0].attn.v_proj
                from tunelab.modules.peft.lora import project

                node = project(x, q, k, v)[0].grad_fn
                if qkv_bias:  # the bias add sits on top of the group node
                    node = node.next_functions[0][0]
                assert "LoRAGroupFunction" in type(node).__name__
            hidden.square().mean().backward()  # (the recompute must see the same backend)
        results[name] = (hidden, {k: p.grad.clone() for k, p in get_adapter_params(model).items()})
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **TOL)
    for k, v in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][k], v, **TOL)


def test_mm_sum_plus_low_rank_op_passes_opcheck():
    from tunelab.kernels.lora import _mm_sum_plus_low_rank_op

    g = torch.Generator().manual_seed(6)
    m1s = [torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)]
    m2s = [torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    l1, l2 = torch.randn(6, 2, generator=g), torch.randn(2, 7, generator=g)
    torch.library.opcheck(_mm_sum_plus_low_rank_op, (m1s, m2s, l1, l2), test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_mm_sum_plus_low_rank_op(m1s, m2s, l1, l2),
                               m1s[0] @ m2s[0] + m1s[1] @ m2s[1] + l1 @ l2, **TOL)


@needs_triton
@pytest.mark.parametrize("base", ["dense", "function"])
def test_compiled_group_is_one_graph_with_the_in_place_ops(compiled_matches_eager, base):
    """torch.compile (fullgraph) of three LoRA projections of one input, dense or
    dequantizing bases: the same numbers as eager, the update and the summed input gradient
    kept in their custom ops (no functionalized addmm copies)."""
    from tunelab.modules.peft.lora import project

    torch.manual_seed(8)
    layers = [LoRALinear(24, o, rank=4, alpha=8).to(DEVICE) for o in (40, 16, 16)]
    for m in layers:
        torch.nn.init.normal_(m.lora_b.weight)
        if base == "function":  # a base the fused path must rebuild (as NF4 layers do)
            m.fused_base = (lambda w: (lambda x: (lambda dtype: w.to(dtype))))(m.weight)
    x = torch.randn(2, 5, 24, device=DEVICE)
    graphs = compiled_matches_eager(lambda t: project(t, *layers), x,
                                    [p for m in layers for p in (m.lora_a.weight, m.lora_b.weight)], **TOL)
    assert any("mm_sum_plus_low_rank" in t for t in graphs["backward"]), graphs["backward"]
    assert not any("addmm" in t for t in graphs["forward"] + graphs["backward"])


def _mlp_block(layers):
    """gate/up/down like FeedForward, with torch's silu (runs in-process on CPU, compiled too)."""
    from tunelab.modules.peft.lora import project
    from tunelab.modules.recompute import is_recomputing

    gate, up, down = layers

    def block(x):
        g, u = project(x, gate, up)
        h = torch.nn.functional.silu(g) * u
        (y,) = project(h, down, unread=is_recomputing())
        return x + y

    return block


@needs_triton
@pytest.mark.parametrize("compiled", [False, True])
def test_recompute_skips_the_unread_down_projection(monkeypatch, compiled):
    """Checkpointing's rerun (marked by wrap_layers' context) skips the down projection's GEMM
    (the spy sees skip=True once per layer in backward) and the gradients equal those of a rerun
    that computes everything (fp32, exact: the same kernels, the skipped result is never read).
    Compiled (inductor), the skipping graph must save the same tensors as the forward's graph:
    checkpointing raises otherwise."""
    import functools

    from torch.utils.checkpoint import checkpoint

    import tunelab.kernels.lora as lora_mod
    from tunelab.training.steps import _recompute_contexts

    skips = []
    eager_mm = lora_mod._mm_plus_low_rank_eager

    def spy(m1, m2, l1, l2, alpha, skip=False, c=None):
        skips.append(skip)
        return eager_mm(m1, m2, l1, l2, alpha, skip, c)

    monkeypatch.setattr(lora_mod, "_mm_plus_low_rank_eager", spy)
    torch.manual_seed(9)
    layers = [LoRALinear(16, 40, rank=4, alpha=8), LoRALinear(16, 40, rank=4, alpha=8), LoRALinear(40, 16, rank=4, alpha=8)]
    for m in layers:
        torch.nn.init.normal_(m.lora_b.weight)
    block = _mlp_block(layers)
    if compiled:
        block = torch.compile(block, backend="inductor")
    x = torch.randn(2, 6, 16)
    results = {}
    for name, context_fn in (("marked", _recompute_contexts), ("plain", None)):
        for m in layers:
            m.zero_grad()
        skips.clear()
        xi = x.clone().requires_grad_()
        kwargs = {"context_fn": context_fn} if context_fn else {}
        run = functools.partial(checkpoint, block, use_reentrant=False, **kwargs)
        with backend("triton"):
            out = run(run(xi))  # two layers
            out.square().sum().backward()
        results[name] = (out, xi.grad, *(p.grad for m in layers for p in (m.lora_a.weight, m.lora_b.weight)))
        assert skips.count(True) == (2 if name == "marked" else 0), skips  # compiled: the op's body calls it
    for a, b in zip(results["marked"], results["plain"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
