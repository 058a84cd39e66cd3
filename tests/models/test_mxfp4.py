"""gpt-oss's MXFP4 expert weights (the Hub's layout): dequantized on load, against transformers.

The checkpoint here (conftest's ``gpt_oss_mxfp4``) is a tiny gpt-oss model written by
transformers whose expert weights are then replaced by random MXFP4 codes and scales (fresh
random bytes, scales around 2^0), stored as the Hub stores them; transformers' own
dequantizing loader is the oracle.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError
from tunelab.models import from_pretrained, save_pretrained
from tunelab.models.mxfp4 import dequantize_mxfp4
from tunelab.modules.nf4 import NF4ExpertWeights

from ..conftest import random_mxfp4


@pytest.fixture(scope="module")
def hub_gpt_oss(make_hf_checkpoint):
    return make_hf_checkpoint("gpt_oss_mxfp4")


def test_dequantize_equals_transformers():
    """Random codes and scales (the full e8m0 range that stays finite): the values equal
    transformers' convert_moe_packed_tensors before its transpose, exactly (both are exact)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4(3, 40, 96, g)
    scales = torch.randint(1, 250, scales.shape, generator=g, dtype=torch.int32).to(torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert ours.shape == (3, 40, 96)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_hub_checkpoint_logits_equal_transformers(hub_gpt_oss):
    """The MXFP4 folder loads dequantized; fp32 logits equal transformers' dequantized load (1e-4,
    the dense gpt-oss parity tolerance)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    ours = from_pretrained(hub_gpt_oss)
    theirs = AutoModelForCausalLM.from_pretrained(hub_gpt_oss, dtype=torch.float32,
                                                  quantization_config=Mxfp4Config(dequantize=True)).eval()
    tokens = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-4)


def test_merged_export_is_dense_and_loads_in_transformers(hub_gpt_oss, tmp_path, load_hf_model):
    """save_pretrained from an MXFP4 source writes dense experts and no quantization_config;
    transformers loads that folder plainly, with the same logits."""
    model = from_pretrained(hub_gpt_oss, dtype=torch.bfloat16)
    out = save_pretrained(model, tmp_path / "merged", source_dir=hub_gpt_oss)
    config = json.loads((out / "config.json").read_text())
    names = load_file(out / "model.safetensors")
    assert "quantization_config" not in config
    assert not [n for n in names if n.endswith(("_blocks", "_scales"))]
    assert names["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    tokens = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(out)(tokens), load_hf_model(out)(tokens).logits,
                                   atol=1e-4, rtol=1e-4)


def test_nf4_from_mxfp4_and_from_dense(hub_gpt_oss, make_hf_checkpoint):
    """quantize: nf4 stores gpt-oss's experts as one NF4 weight per expert (input-major view
    kept), from the Hub's MXFP4 folder and from a dense one; the dense view dequantizes to
    within NF4's error of the source weights (each element within half the widest gap of the
    NF4 levels, 0.152, of its block's absmax, plus that absmax's 8-bit rounding: bounded here
    by 0.2 x the tensor's largest |w|) and the model runs."""
    for source in (hub_gpt_oss, make_hf_checkpoint("gpt_oss", intermediate_size=64)):
        reference = from_pretrained(source)
        model = from_pretrained(source, quantize="nf4")
        experts = model.layers[0].mlp.experts
        assert isinstance(experts.gate_up_proj, NF4ExpertWeights) and experts.gate_up_proj.transposed
        assert tuple(experts.gate_up_proj.shape) == tuple(reference.layers[0].mlp.experts.gate_up_proj.shape)
        state = model.state_dict()
        for name, want in reference.state_dict().items():
            assert state[name].shape == want.shape, name
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                error = (state[name] - want).abs().max()
                assert error <= 0.2 * want.abs().max(), name
        tokens = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.isfinite(model(tokens)).all()


def test_unpaired_or_malformed_mxfp4_says_so(hub_gpt_oss, tmp_path):
    """A blocks tensor without its scales, or with scales of another shape: one line naming it."""
    broken = tmp_path / "broken"
    shutil.copytree(hub_gpt_oss, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    tensors["model.layers.0.mlp.experts.down_proj_scales"] = tensors["model.layers.0.mlp.experts.down_proj_scales"][:, :3].contiguous()
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        from_pretrained(broken)
    message = str(info.value)
    assert "\n" not in message and "down_proj" in message and "re-download" in message
