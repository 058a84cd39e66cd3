"""Loading HF checkpoints into NF4: dense ones quantized while loading, and pre-quantized
bitsandbytes 4-bit checkpoints written by transformers (the oracle for their format)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch import nn

from tunelab.errors import CheckpointError, ConfigError
from tunelab.models import from_pretrained, save_pretrained
from tunelab.modules.nf4 import NF4Linear, to_nf4
from tunelab.modules.peft import apply_lora
from tunelab.modules.peft import merge_lora_state_dict

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
PROJ = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit of a [n / 64, 64] view (see test_nf4_quantize.bnb_dequantize:
    its AVX-512 CPU kernel mis-scales rows that are not whole 64-blocks, e.g. down_proj [64, 160])."""
    import copy

    import bitsandbytes.functional as bnb

    flat_state = copy.copy(state)
    flat_state.shape = torch.Size((state.shape.numel() // 64, 64))
    return bnb.dequantize_4bit(packed, flat_state).reshape(state.shape)


def _tokens(seed=0):
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama3", "llama3_2"])
def test_quantize_while_loading(make_hf_checkpoint, kind):
    """Only the decoder projections become NF4; logits equal (1e-5, fp32 summation order) those
    of the dense model carrying the dequantized weights, and stay within NF4 error of the
    original model's (relative L2 < 0.25; NF4 on Gaussian weights is ~0.1 per matrix)."""
    ckpt = make_hf_checkpoint(kind)
    dense = from_pretrained(ckpt)
    quant = from_pretrained(ckpt, quantize="nf4")
    for layer in quant.layers:
        for name in PROJ:
            assert isinstance(layer.get_submodule(name), NF4Linear)
    assert all(p.dtype == torch.float32 for p in quant.parameters())  # embeddings, norms, head
    if kind == "llama3":
        assert type(quant.output) is nn.Linear
    reference = from_pretrained(ckpt)
    reference.load_state_dict(quant.state_dict())  # dense model, dequantized weights
    tokens = _tokens()
    with torch.no_grad():
        ours, ref, orig = quant(tokens), reference(tokens), dense(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    rel = ((ours - orig).norm() / orig.norm()).item()
    assert 1e-3 < rel < 0.25, rel


def test_quantize_bf16_and_bad_value(make_hf_checkpoint):
    ckpt = make_hf_checkpoint("llama2")
    model = from_pretrained(ckpt, dtype=torch.bfloat16, quantize="nf4")
    w = model.layers[0].attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and w.bytes_per_param < 0.6  # tiny matrices: one fp32 scale each
    assert model(_tokens()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="nf4"):
        from_pretrained(ckpt, quantize="int4")


# ------------------------------------------------------------------ pre-quantized checkpoints
@pytest.fixture(scope="module")
def bnb_checkpoint(make_hf_checkpoint, tmp_path_factory):
    """(folder, in-memory transformers model) for a tiny llama3 quantized by transformers +
    bitsandbytes on CPU (nf4, double quantization) and saved with save_pretrained."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dense = make_hf_checkpoint("llama3")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    hf = LlamaForCausalLM.from_pretrained(dense, quantization_config=qcfg, dtype=torch.bfloat16, device_map="cpu")
    out = tmp_path_factory.mktemp("bnb_nf4")
    hf.save_pretrained(out)
    return out, hf


def test_prequantized_weights_equal_bitsandbytes(bnb_checkpoint, make_hf_checkpoint):
    """The stored codes are used as they are: our dequantized weights == bitsandbytes'
    dequantize_4bit of the same module, bit for bit; and to_nf4 of the bf16 weights reproduces
    the stored bytes."""
    from safetensors import safe_open

    folder, hf = bnb_checkpoint
    model = from_pretrained(folder, dtype=torch.bfloat16, quantize="nf4")
    dense_bf16 = from_pretrained(make_hf_checkpoint("llama3"), dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored_codes = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    for i, layer in enumerate(model.layers):
        hf_layer = hf.model.layers[i]
        for name in PROJ:
            ours = layer.get_submodule(name)
            assert isinstance(ours, NF4Linear) and ours.weight.code is None  # standard tables
            hf_name = name.replace("attn.", "self_attn.")
            p = hf_layer.get_submodule(hf_name).weight
            theirs = _bnb_dequantize(p.data, p.quant_state)
            assert torch.equal(ours.weight.dequantize(torch.bfloat16), theirs), (i, name)
    fresh = to_nf4(dense_bf16.layers[1].mlp.down_proj.weight.detach())
    assert torch.equal(fresh.codes, stored_codes.reshape(-1))
    # quantize=None: the same values, dequantized into a plain dense model
    plain = from_pretrained(folder, dtype=torch.bfloat16)
    assert type(plain.layers[0].attn.q_proj) is nn.Linear
    torch.testing.assert_close(plain.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight.dequantize(),
                               rtol=0, atol=0)
    torch.testing.assert_close(plain.tok_embeddings.weight, dense_bf16.tok_embeddings.weight, rtol=0, atol=0)


def test_merged_export_of_prequantized_is_plain_bf16(bnb_checkpoint, tmp_path, load_hf_model):
    """Merging LoRA into a 4-bit base writes a dense checkpoint without quantization_config."""
    folder, _ = bnb_checkpoint
    model = from_pretrained(folder, dtype=torch.bfloat16, quantize="nf4")
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4, adapter_dtype=torch.float32)
    out = save_pretrained(merge_lora_state_dict(model), tmp_path / "merged", source_dir=folder, args=model.args)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    hf = load_hf_model(out)  # transformers reads it as an ordinary model
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def _with_quant_config(folder, tmp_path, **changes):
    out = tmp_path / "variant"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(bnb_4bit_quant_type="fp4"), "fp4"),
        (dict(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True, _load_in_8bit=True), "8-bit"),
        (dict(quant_method="gptq"), "gptq"),
        (dict(bnb_4bit_use_double_quant=False), "double quantization"),
    ],
)
def test_unsupported_quantization_is_one_line(bnb_checkpoint, tmp_path, changes, words):
    folder, _ = bnb_checkpoint
    variant = _with_quant_config(folder, tmp_path, **changes)
    with pytest.raises(CheckpointError, match=words) as info:
        from_pretrained(variant, quantize="nf4")
    assert "\n" not in str(info.value)


def test_prequantized_moe_is_refused_with_the_way_out(make_hf_checkpoint, tmp_path):
    """A bitsandbytes 4-bit config on an MoE checkpoint: one line naming the unquantized
    checkpoint with quantize: nf4 as the way to QLoRA (checked before any tensor is read)."""
    folder = tmp_path / "moe"
    shutil.copytree(make_hf_checkpoint("qwen3_moe"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                  "bnb_4bit_use_double_quant": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mixture-of-experts.*quantize: nf4") as info:
        from_pretrained(folder, quantize="nf4")
    assert "\n" not in str(info.value)


def test_loading_keeps_one_dense_weight_at_a_time(make_hf_checkpoint, monkeypatch):
    """Each dense projection is gone by the time the next one is quantized, so peak memory is
    the NF4 model plus one dense weight (never the dense model)."""
    import weakref

    from tunelab.models import quantize as quantize_module

    seen: list[weakref.ref] = []
    real_to_nf4 = quantize_module.to_nf4

    def watching_to_nf4(weight, *args, **kwargs):
        alive = [r for r in seen if r() is not None]
        assert not alive, f"{len(alive)} earlier dense weights still alive"
        out = real_to_nf4(weight, *args, **kwargs)
        seen.append(weakref.ref(weight))
        return out

    monkeypatch.setattr(quantize_module, "to_nf4", watching_to_nf4)
    from_pretrained(make_hf_checkpoint("llama2"), quantize="nf4")
    assert len(seen) == 2 * len(PROJ)
