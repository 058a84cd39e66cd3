"""Activation offloading: the checkpointed layer inputs and the kept attention (training/offload.py).

fp32 on CPU: offloading only moves saved tensors between buffers, so losses and gradients must
be bit-identical to plain activation checkpointing (within 1e-5 where attention is kept: see
the kept-attention test). The CUDA test (skipped on CPU) checks the
same with real pinned-memory copies on side streams, and that the device memory held between
forward and backward drops by the offloaded inputs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.models import build_model, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training.steps import wrap_layers


def _grads(model, tokens):
    loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in get_adapter_params(model).items()}


def test_offloaded_inputs_give_identical_gradients_over_two_steps(tiny_lora_model):
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, offloaded = tiny_lora_model("cpu", False), tiny_lora_model("cpu", True)
    offloader = offloaded.layers[0].forward.args[0]
    offloader.min_bytes = 0  # the tiny model's inputs are a few KiB
    for _ in range(2):  # the second step reuses the host buffers of the first
        loss_a, grads_a = _grads(plain, tokens)
        loss_b, grads_b = _grads(offloaded, tokens)
        assert torch.equal(loss_a, loss_b)
        for k in grads_a:
            assert torch.equal(grads_a[k], grads_b[k]), k
    # per layer: its input (not layer 0's: the frozen embedding's output is not in the graph)
    # and what the kept attention saved that requires grad: RoPE'd q and k, v, the output (k
    # not in layer 0, whose k_proj has no adapter and whose input needs no gradient)
    n, d = tokens.numel(), offloaded.args
    q = out = n * d.n_heads * d.head_dim * 4
    k = v = n * d.n_kv_heads * d.head_dim * 4
    assert offloader.offloaded_bytes == (q + v + out) + (n * d.dim * 4 + q + k + v + out)
    assert offloader._live == 0  # backward consumed every offloaded tensor


def test_small_and_non_grad_tensors_stay():
    from tunelab.training.offload import ActivationOffloader

    off = ActivationOffloader(min_bytes=1 << 10)
    small = torch.randn(4, requires_grad=True)
    ids = torch.arange(4096)
    assert off._pack(small) is small and off._pack(ids) is ids


def test_transposed_activation_keeps_its_strides_and_reuses_its_buffer():
    # q/k/v and SDPA's output are transposed views: a host buffer of the same strides makes each
    # copy one memcpy (no gather into a contiguous temporary) and the tensor comes back as it was
    from tunelab.training.offload import ActivationOffloader

    off = ActivationOffloader(min_bytes=0)
    t = torch.randn(2, 6, 3, 4, requires_grad=True).transpose(1, 2)  # [b, h, s, d] of [b, s, h, d]
    with off.hooks():
        handle = off._pack(t)
    host = handle.host
    assert host.stride() == t.stride()
    back = off._unpack(handle)
    assert torch.equal(back, t) and back.stride() == t.stride()
    with off.hooks():  # a second step: the released buffer serves the same layout again
        assert off._pack(t.detach().clone().requires_grad_()).host is host  # clone keeps the strides


def test_offload_needs_activation_checkpointing():
    model = build_model(tiny(vocab_size=96), device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match="offload_activations"):
        wrap_layers(model, activation_checkpointing=False, compile_layers=False, offload_activations=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned-memory offload runs on CUDA")
def test_cuda_offload_matches_and_frees_device_memory(tiny_lora_model):
    tokens = torch.randint(0, 96, (4, 512), device="cuda")
    held = {}
    for offload in (False, True):
        model = tiny_lora_model("cuda", offload)
        if offload:
            model.layers[0].forward.args[0].min_bytes = 0
        _grads(model, tokens)  # warm-up (allocator, host buffers)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens).float().logsumexp(-1).mean()
        torch.cuda.synchronize()
        held[offload] = torch.cuda.memory_allocated() - before
        loss.backward()
        held[f"grads{offload}"] = {k: p.grad.clone() for k, p in get_adapter_params(model).items()}
    for k, g in held["gradsFalse"].items():  # 1e-5: the kept attention's SDPA takes GQA k/v unexpanded
        torch.testing.assert_close(held["gradsTrue"][k], g, rtol=1e-5, atol=1e-5)
    layer_input = tokens.numel() * model.args.dim * 4
    assert held[False] - held[True] >= (len(model.layers) - 2) * layer_input  # all but layer 0's (and slack)


def _all_linear_model(offload: bool, compiled: bool, n_layers: int = 3, nf4: bool = False, qk_norm: bool = False):
    torch.manual_seed(0)
    args = tiny(vocab_size=96, n_layers=n_layers)
    args.qk_norm = qk_norm  # Qwen3's per-head q/k norms: inside the kept region
    model = build_model(args, device="cpu", dtype=torch.float32)
    if qk_norm:
        for layer in model.layers:
            for norm in (layer.attn.q_norm, layer.attn.k_norm):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.1)
    if nf4:
        from tunelab.modules.nf4 import quantize_linears_

        quantize_linears_(model)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=4, alpha=8)
    for p in get_adapter_params(model).values():
        torch.nn.init.normal_(p, std=0.05)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=True, compile_layers=compiled, offload_activations=offload)
    if offload:
        model.layers[0].forward.args[0].min_bytes = 0
    return model


@pytest.mark.parametrize("compiled,nf4,qk_norm", [(False, False, False), (True, False, False), (True, True, False),
                                                  (False, False, True)])
def test_kept_attention_is_not_recomputed_and_gives_the_same_gradients(monkeypatch, compiled, nf4, qk_norm):
    """With offloading, attention (RoPE + SDPA) is kept instead of recomputed: the rerun calls it
    no more, skips the q/k/v GEMMs (and the down projection's) and the gradients over two steps
    equal plain checkpointing's. The LoRA functions take their fused path on CPU here (they are
    torch-level code); the other kernels run their references. fp32, 1e-5: the kept attention
    hands SDPA grouped-query k/v (enable_gqa) where the plain path expands them, a different
    summation order; compiled, each rerun graph must also save exactly what its forward graph
    saved (checkpointing raises otherwise), also with NF4 bases (QLoRA: the LoRA functions then
    get dequantizing functions, rebuilt in every pass). Compiled means inductor's graph
    capture, decompositions and forward/backward partitioner (which decide what is saved),
    run without its code generation (backend aot_eager_decomp_partition): generating and
    building the C++ kernels would take over a minute on 2 cores and check nothing more here."""
    import tunelab.kernels.lora as lora_kernels
    import tunelab.modules.attention as attention
    import tunelab.modules.peft.lora as peft_lora

    monkeypatch.setattr(peft_lora, "use_triton", lambda x: True)
    monkeypatch.setattr(lora_kernels, "use_triton", lambda x: True)
    # the one-node LoRA MLP needs its Triton kernels (tests/kernels/test_lora_mlp.py): the MLPs
    # here run their projections one by one
    monkeypatch.setattr(peft_lora, "lora_mlp", lambda *args, **kwargs: None)
    skips, kept_calls = [], []
    eager_mm, rope_attention = lora_kernels._mm_plus_low_rank_eager, attention.rope_attention

    def spy_mm(m1, m2, l1, l2, alpha, skip=False, c=None):
        skips.append(skip)
        return eager_mm(m1, m2, l1, l2, alpha, skip, c)

    def spy_attention(*args):
        kept_calls.append(1)
        return rope_attention(*args)

    monkeypatch.setattr(lora_kernels, "_mm_plus_low_rank_eager", spy_mm)
    monkeypatch.setattr(attention, "rope_attention", spy_attention)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition"))
    torch._dynamo.reset()
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = _all_linear_model(False, compiled, nf4=nf4, qk_norm=qk_norm)
    offloaded = _all_linear_model(True, compiled, nf4=nf4, qk_norm=qk_norm)
    n_layers = len(offloaded.layers)
    for _ in range(2):
        loss_a, grads_a = _grads(plain, tokens)
        skips.clear(), kept_calls.clear()
        loss_b, grads_b = _grads(offloaded, tokens)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
        for k in grads_a:
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-5, msg=k)
        assert len(kept_calls) == n_layers  # forward only: the reruns replayed it
        assert skips.count(True) == 4 * n_layers  # q, k, v and down per rerun
        for p in offloaded.parameters():
            p.grad = None
        for p in plain.parameters():
            p.grad = None
    torch._dynamo.reset()


def test_fetch_order_follows_the_backward():
    """Which offloaded tensors are brought back when (the policy; the copies themselves run on
    CUDA): a layer's q/k/v when its recompute starts, the previous layer's input and attention
    output once backward reaches this layer's attention, so each arrives before it is needed
    without holding the next layer's q/k/v during this layer's MLP backward."""
    model = _all_linear_model(True, False, n_layers=3)
    off = model.layers[0].forward.args[0]
    events = []
    fetch, take = off._fetch, off._take

    def spy_fetch(handle):
        if handle.host is not None and not getattr(handle, "seen", False):
            handle.seen = True
            events.append(("fetch", handle.group, handle.early))
        return fetch(handle)

    def spy_take(handle, *, unpack):
        events.append(("take" if unpack else "replay", handle.group, handle.early))
        return take(handle, unpack=unpack)

    off._fetch, off._take = spy_fetch, spy_take
    loss = model(torch.randint(0, 96, (2, 24))).float().logsumexp(-1).mean()
    groups = [[(h.kept, h.early) for h in g] for g in off._groups]
    shapes = [[tuple(h.host.shape) for h in g] for g in off._groups]
    # layer 2: its input (packed by the checkpoint, before the layer runs), then the kept
    # attention's q, k, v and its output (saved by SDPA and replayed: one copy, early)
    assert groups[2] == [(False, True), (True, False), (True, False), (True, False), (True, True)], shapes
    loss.backward()
    first = [e for e in events if e[0] == "fetch"]
    assert len(first) == sum(len(g) for g in groups)  # every tensor came back once
    # last layer: everything on its first use; then, per layer g < 2, its input and output
    # (early) when layer g + 1's attention backward takes its first kept tensor, the rest
    # (q, k, v) when layer g's own recompute takes its input
    for g in (1, 0):
        first_kept_take = next(i for i, e in enumerate(events) if e[0] == "take" and e[1] == g + 1 and not e[2])
        early_fetches = [i for i, e in enumerate(events) if e == ("fetch", g, True)]
        late_fetches = [i for i, e in enumerate(events) if e == ("fetch", g, False)]
        assert early_fetches and min(early_fetches) > first_kept_take
        first_take = next(i for i, e in enumerate(events) if e[0] in ("take", "replay") and e[1] == g)
        assert min(early_fetches) < first_take < min(late_fetches)
    assert off._live == 0  # all consumed


def _offload_model(offload, host_gib=None):
    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=96, n_layers=4), device="cpu", dtype=torch.float32)
    apply_lora(model, "all-linear", rank=4, alpha=8)
    for p in get_adapter_params(model).values():
        torch.nn.init.normal_(p, std=0.05)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=True, compile_layers=False, offload_activations=offload,
                offload_host_gib=host_gib)
    if offload:
        model.layers[0].forward.args[0].min_bytes = 0
    return model


def test_inputs_only_offload_recomputes_attention_and_caps_host_memory(monkeypatch):
    """``offload_activations: inputs`` moves the layer inputs only (attention is recomputed, as
    plain checkpointing does) and ``offload_host_gib`` caps the copies of one forward: past it
    the remaining layers keep their inputs where they are. Gradients are bit-identical to plain
    checkpointing either way (the same kernels on the same values)."""
    import tunelab.modules.attention as attention

    calls = []
    rope_attention = attention.rope_attention
    monkeypatch.setattr(attention, "rope_attention", lambda *a: calls.append(1) or rope_attention(*a))
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    plain_loss, plain = _grads(_offload_model(False), tokens)
    d = tiny(vocab_size=96, n_layers=4)
    layer_input = tokens.numel() * d.dim * 4  # fp32 [2, 24, dim]; layer 0's input needs no grad
    for host_gib, offloaded_layers in ((None, 3), (2.5 * layer_input / 2**30, 2)):
        model = _offload_model("inputs", host_gib)
        offloader = model.layers[0].forward.args[0]
        assert not offloader.keep_regions
        loss, grads = _grads(model, tokens)
        assert calls == [] and torch.equal(loss, plain_loss)  # the kept-region path never ran
        for k in plain:
            assert torch.equal(grads[k], plain[k]), k
        assert offloader.offloaded_bytes == offloaded_layers * layer_input
        assert offloader._live == 0


def test_offload_falls_back_without_pinned_memory(monkeypatch, capsys):
    """On a CUDA device whose pinned allocations fail (a low locked-memory limit), the switch is
    turned off with a one-line notice instead of failing mid-step."""
    from tunelab.training import utils

    monkeypatch.setattr(utils, "_pinned_memory_works", lambda: False)
    flags = utils.cuda_only_settings_notice(torch.device("cuda"), compile=True, offload_activations="inputs")
    assert flags == {"compile": True, "offload_activations": False}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "offload_activations switched off: pinned host memory" in out[0]
    assert utils.cuda_only_settings_notice(torch.device("cpu"), offload_activations="inputs") == {
        "offload_activations": False}
    capsys.readouterr()
    # the other ranks of a distributed run decide the same, silently
    assert utils.cuda_only_settings_notice(torch.device("cuda"), announce=False, offload_activations=True) == {
        "offload_activations": False}
    assert capsys.readouterr().out == ""
