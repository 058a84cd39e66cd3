"""NF4Linear / NF4LoRALinear: forward, backward without a saved dense base, state-dict view,
and putting LoRA on a quantized model. Oracle: the same layers with the explicitly dequantized
weight as a dense, frozen tensor (fp32 on CPU: the math is the same, tolerance 1e-5 for
summation order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.kernels import HAS_TRITON, backend
from tunelab.modules.nf4 import NF4Linear, NF4LoRALinear, NF4Weight, quantize_linears_, to_nf4
from tunelab.modules.peft import LoRALinear, apply_lora, get_adapter_params, merge_lora_state_dict, set_trainable_params

TOL = dict(rtol=1e-5, atol=1e-5)


def _saved_tensor_sizes(fn):
    """Numels of every tensor autograd saves while ``fn()`` runs its forward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def test_nf4_linear_forward_backward_matches_dequantized():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * 0.05
    layer = NF4Linear(to_nf4(w))
    dense = layer.weight.dequantize()
    x = torch.randn(3, 5, 80, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, saved = _saved_tensor_sizes(lambda: layer(x))
    # nothing of the weight's size (48*80) or the input's (kept for a weight grad) is saved
    assert all(n < 48 * 80 for n in saved), saved
    y_ref = F.linear(x_ref, dense)
    torch.testing.assert_close(y, y_ref, **TOL)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    assert list(layer.parameters()) == []  # the base has no parameter, hence no gradient


def test_nf4_linear_bf16_compute():
    """Forward in the activations' dtype: bf16 input -> bf16 output, same as dense bf16 math."""
    w = torch.randn(32, 64) * 0.05
    layer = NF4Linear(to_nf4(w))
    x = torch.randn(4, 64).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, layer.weight.dequantize(torch.bfloat16)), rtol=0, atol=0)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_qlora_adapter_grads_match_dequantized_reference(kernels, monkeypatch):
    """Adapter gradients of NF4LoRALinear == those of LoRALinear over the dequantized weight,
    on the unfused module path (``reference``) and the fused LoRA function (``triton``: one
    autograd node that dequantizes the base in its forward and again in its backward)."""
    if kernels == "triton" and not HAS_TRITON:
        pytest.skip("backend 'triton' needs the triton package")
    # the LoRA function is torch-level; NF4's Triton dequantization runs on CUDA only here
    # (tests/kernels checks it on CPU under TRITON_INTERPRET=1)
    monkeypatch.setattr("tunelab.kernels.nf4.use_triton", lambda x: x.is_cuda)
    torch.manual_seed(0)
    w4 = to_nf4(torch.randn(40, 72) * 0.05)
    qlora = NF4LoRALinear(w4, rank=4, alpha=8.0, dropout=0.0)
    ref = LoRALinear(72, 40, 4, 8.0, weight=w4.dequantize().clone())
    with torch.no_grad():
        qlora.lora_b.weight.normal_()  # B starts at zero: make A's gradient non-trivial
        ref.lora_a.weight.copy_(qlora.lora_a.weight)
        ref.lora_b.weight.copy_(qlora.lora_b.weight)
    x = torch.randn(2, 6, 72)
    x_ref = x.clone()
    x.requires_grad_(True)
    x_ref.requires_grad_(True)
    with backend(kernels):
        out, saved = _saved_tensor_sizes(lambda: qlora(x))
    assert ("LoRALinearFunction" in type(out.grad_fn).__name__) == (kernels == "triton")
    assert all(n < 40 * 72 for n in saved), saved  # no dense base copy kept for backward
    with backend("reference"):
        out_ref = ref(x_ref)
    torch.testing.assert_close(out, out_ref, **TOL)
    (out.square().sum()).backward()
    (out_ref.square().sum()).backward()
    torch.testing.assert_close(qlora.lora_a.weight.grad, ref.lora_a.weight.grad, **TOL)
    torch.testing.assert_close(qlora.lora_b.weight.grad, ref.lora_b.weight.grad, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    assert isinstance(qlora.weight, NF4Weight) and not any(p is None for p in qlora.parameters())
    assert {n for n, _ in qlora.named_parameters()} == {"lora_a.weight", "lora_b.weight"}
    # merged: dequantized base + update, a plain dense weight in the base dtype
    torch.testing.assert_close(qlora.merged_weight(), ref.merged_weight(), **TOL)


def test_state_dict_is_dense_and_loads_back():
    """state_dict() shows <name>.weight dequantized; load_state_dict quantizes a dense weight."""
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 16, bias=False))
    quantize_linears_(model, skip=())
    sd = model.state_dict()
    assert set(sd) == {"0.weight", "1.weight"} and sd["0.weight"].shape == (32, 64)
    torch.testing.assert_close(sd["0.weight"], model[0].weight.dequantize(), rtol=0, atol=0)
    fresh = torch.randn(32, 64) * 0.1
    model.load_state_dict({"0.weight": fresh, "1.weight": sd["1.weight"]})
    assert torch.equal(model[0].weight.codes, to_nf4(fresh).codes)
    # re-quantizing dequantized values moves them by the 8-bit scale error only (~1%)
    torch.testing.assert_close(model[1].weight.dequantize(), sd["1.weight"], rtol=0.02, atol=2e-3)


def test_quantize_linears_keeps_lora_adapters_and_skips_output():
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(64, 64, bias=False), "output": nn.Linear(64, 10, bias=False)})
    apply_lora(model, ["proj"], rank=2, alpha=4)
    a = model["proj"].lora_a.weight
    quantize_linears_(model)
    assert isinstance(model["proj"], NF4LoRALinear) and model["proj"].lora_a.weight is a
    assert type(model["output"]) is nn.Linear


def test_apply_lora_on_nf4_tiny_model(make_hf_checkpoint):
    """Same targets and same initial adapters (same seed) as apply_lora on the dense model;
    output stays dense LoRA; unknown names fail as in apply_lora."""
    from tunelab.models import from_pretrained

    ckpt = make_hf_checkpoint("llama3")
    dense = from_pretrained(ckpt)
    quant = from_pretrained(ckpt, quantize="nf4")
    targets = ["q_proj", "v_proj", "down_proj", "output"]
    torch.manual_seed(3)
    apply_lora(dense, targets, rank=4, alpha=8)
    torch.manual_seed(3)
    apply_lora(quant, targets, rank=4, alpha=8)
    assert isinstance(quant.layers[1].attn.q_proj, NF4LoRALinear)
    assert isinstance(quant.layers[1].attn.k_proj, NF4Linear)
    assert type(quant.output) is LoRALinear
    a, b = get_adapter_params(dense), get_adapter_params(quant)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ConfigError, match="q_prj"):
        apply_lora(from_pretrained(ckpt, quantize="nf4"), ["q_prj"], rank=4, alpha=8)
    merged = merge_lora_state_dict(quant)  # dense, no lora keys, every weight present
    assert set(merged) == set(dense.state_dict()) - {k for k in dense.state_dict() if ".lora_" in k}


def test_dequantize_op_passes_opcheck():
    """The custom op compiled QLoRA layers call: schema and fake implementation consistent."""
    from tunelab.kernels.nf4 import _dequantize_nf4_op

    w4 = to_nf4(torch.randn(24, 40) * 0.05)
    code, absmax_code = w4.levels()
    args = (w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset, code, absmax_code, w4.numel(), 64, 256,
            torch.bfloat16)
    torch.library.opcheck(_dequantize_nf4_op, args, test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_dequantize_nf4_op(*args).view(24, 40), w4.dequantize(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="backend 'triton' needs the triton package")
def test_compiled_qlora_layer_is_one_graph_with_opaque_dequantization(monkeypatch, compiled_matches_eager):
    """torch.compile of a QLoRA layer (fullgraph: no graph break, as the 8B QLoRA config
    compiles each decoder layer): the forward and the backward graph each dequantize the base
    through the custom op and add the update in place; numbers equal eager."""
    monkeypatch.setattr("tunelab.kernels.nf4.use_triton", lambda x: x.is_cuda)  # see the test above
    torch.manual_seed(1)
    layer = NF4LoRALinear(to_nf4(torch.randn(40, 72) * 0.05), rank=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(2, 6, 72)
    graphs = compiled_matches_eager(layer, x, [layer.lora_a.weight, layer.lora_b.weight], **TOL)
    for kind in ("forward", "backward"):
        assert any("tunelab.dequantize_nf4" in t for t in graphs[kind]), (kind, graphs[kind])
        assert any("tunelab.mm_plus_low_rank" in t for t in graphs[kind]), (kind, graphs[kind])


def test_count_parameters_counts_an_nf4_base_by_its_weights():
    """The model-size line of every recipe: an NF4 base counts its weights (not its packed
    bytes), whether the storage is buffers (one device) or frozen parameters (the FSDP build)."""
    from types import SimpleNamespace

    from tunelab.models import build_model, tiny
    from tunelab.training.sharding import build_meta_model
    from tunelab.training.spine import count_parameters

    args = tiny(vocab_size=64)
    lora = SimpleNamespace(targets=["q_proj", "v_proj"], rank=2, alpha=4, dropout=0.0, use_dora=False)
    dense = build_model(args, device="meta", dtype=torch.float32)  # the same model, dense
    apply_lora(dense, lora.targets, lora.rank, lora.alpha)
    adapters = sum(p.numel() for n, p in dense.named_parameters() if ".lora_" in n)
    want = (sum(p.numel() for p in dense.parameters()), adapters)

    one_device = build_model(args, device="cpu", dtype=torch.float32)
    quantize_linears_(one_device)
    apply_lora(one_device, lora.targets, lora.rank, lora.alpha)
    set_trainable_params(one_device)
    assert count_parameters(one_device) == want
    assert count_parameters(build_meta_model(args, torch.float32, lora, "nf4")) == want
