"""DoRA (``lora.use_dora``) against PEFT's DoRA, the oracle: same logits and gradients on a tiny
transformers model (fp32, 1e-5: the same math, only the row norm is computed another way, see
``LoRALinear.weight_norm``), the adapter folder loads in PEFT, the merged export equals the
adapter model, QLoRA + DoRA trains.
"""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.models.adapters import _hf_module, load_adapter, save_adapter
from tunelab.models.checkpoint import from_pretrained
from tunelab.modules.peft import apply_lora, get_adapter_params, merge_lora_state_dict, set_trainable_params
from tunelab.modules.peft.lora import LoRALinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ckpt(make_hf_checkpoint):
    return make_hf_checkpoint("llama3")


def _tokens(seed=1):
    return torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(seed))


def _dora_model(ckpt, dropout=0.0, quantize=None):
    model = from_pretrained(ckpt, dtype=torch.float32, quantize=quantize)
    apply_lora(model, TARGETS, rank=4, alpha=8, dropout=dropout, use_dora=True, adapter_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B non-zero, magnitudes off the norms
        for name, p in get_adapter_params(model).items():
            if name.endswith("lora_b.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("lora_magnitude"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    set_trainable_params(model)
    return model


def _peft_name(native: str, args) -> str:
    """PEFT's parameter name for a native adapter parameter name."""
    module, _, leaf = native.rpartition(".lora_")
    hf = _hf_module(module, args)
    leaf = {"a.weight": "lora_A.default.weight", "b.weight": "lora_B.default.weight",
            "magnitude": "lora_magnitude_vector.default.weight"}[leaf]
    return f"base_model.model.{hf}.{leaf}"


def test_weight_norm_is_the_row_norm_of_the_updated_weight(ckpt):
    layer = _dora_model(ckpt).layers[0].attn.q_proj
    want = torch.linalg.vector_norm(layer.weight.double() + layer.scaling * (layer.lora_b.weight.double()
                                                                            @ layer.lora_a.weight.double()), dim=1)
    torch.testing.assert_close(layer.weight_norm().double(), want, rtol=1e-6, atol=0)


def test_fresh_dora_is_the_base_model(ckpt):
    """B = 0 and m = ||W0||: a new DoRA adapter changes nothing, as with LoRA."""
    model = from_pretrained(ckpt, dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
        apply_lora(model, TARGETS, rank=4, alpha=8, use_dora=True)
        torch.testing.assert_close(model(tokens), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_logits_and_gradients_equal_peft(ckpt, load_hf_model, tmp_path, dropout):
    """Our DoRA model and PEFT's (loaded from our adapter folder, trainable) in train mode:
    the same logits and the same gradients of every A, B and magnitude. With dropout both
    draw one mask per adapted layer in the same order, so the same seed gives the same masks."""
    from peft import PeftModel

    model = _dora_model(ckpt, dropout=dropout).train()
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["lora_dropout"] == dropout
    peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), out, is_trainable=True).train()
    tokens = _tokens()
    torch.manual_seed(5)
    ours = model(tokens)
    torch.manual_seed(5)
    theirs = peft_model(tokens).logits
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.logsumexp(-1).mean().backward()
    theirs.logsumexp(-1).mean().backward()
    peft_params = dict(peft_model.named_parameters())
    params = get_adapter_params(model)
    assert sum(name.endswith("magnitude") for name in params) == 14  # 7 targets x 2 layers
    for name, p in params.items():
        torch.testing.assert_close(p.grad, peft_params[_peft_name(name, model.args)].grad, **TOL, msg=name)


def test_adapter_loads_in_peft_and_equals_the_merged_export(ckpt, load_hf_model, tmp_path):
    """The PEFT folder (use_dora, lora_magnitude_vector) loads in PEFT and in tunelab with our
    logits; the merged weights (rows rescaled to their magnitudes) give them too, in
    transformers (1e-4: fp32, a merged GEMM against base + update)."""
    from peft import PeftModel

    from tunelab.models.checkpoint import save_pretrained

    model = _dora_model(ckpt).eval()
    tokens = _tokens(2)
    with torch.no_grad():
        ours = model(tokens)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_hf_model(ckpt), out).eval()(tokens).logits
        torch.testing.assert_close(peft_logits, ours, rtol=1e-4, atol=1e-4)
        again = load_adapter(from_pretrained(ckpt, dtype=torch.float32), out).eval()
        assert all(m.use_dora for m in again.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(again(tokens), ours, rtol=1e-6, atol=1e-6)
        merged = from_pretrained(ckpt, dtype=torch.float32)
        merged.load_state_dict(merge_lora_state_dict(model))
        save_pretrained(merged, tmp_path / "merged")
        hf_merged = load_hf_model(tmp_path / "merged").eval()(tokens).logits
    torch.testing.assert_close(hf_merged, ours, rtol=1e-4, atol=1e-4)


def test_qlora_dora_matches_dora_over_the_dequantized_base(ckpt):
    """DoRA over an NF4 base computes the same as over the dequantized weights (norms,
    rescaled rows, gradients; 1e-5) and its magnitudes start at the NF4 weights' row norms."""
    nf4 = _dora_model(ckpt, quantize="nf4")
    q = nf4.layers[0].mlp.down_proj
    assert torch.allclose(q.weight_norm(), torch.linalg.vector_norm(
        q.dense_base_weight().float() + q.scaling * q.lora_b.weight @ q.lora_a.weight, dim=1), rtol=1e-5)
    dense = from_pretrained(ckpt, dtype=torch.float32)
    dense.load_state_dict({k: v for k, v in nf4.state_dict().items() if "lora_" not in k}, strict=False)
    apply_lora(dense, TARGETS, rank=4, alpha=8, use_dora=True)
    dense.load_state_dict({k: v for k, v in nf4.state_dict().items() if "lora_" in k}, strict=False)
    set_trainable_params(dense)
    tokens = _tokens(3)
    a, b = nf4(tokens), dense(tokens)
    torch.testing.assert_close(a, b, **TOL)
    a.logsumexp(-1).mean().backward()
    b.logsumexp(-1).mean().backward()
    dense_params = get_adapter_params(dense)
    for name, p in get_adapter_params(nf4).items():
        torch.testing.assert_close(p.grad, dense_params[name].grad, **TOL, msg=name)


def test_dora_on_expert_weights_is_refused(make_hf_checkpoint):
    from tunelab.errors import ConfigError

    model = from_pretrained(make_hf_checkpoint("qwen3_moe"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="lora.use_dora: DoRA is not available for 'experts'"):
        apply_lora(model, ["q_proj", "experts"], rank=4, alpha=8, use_dora=True)

