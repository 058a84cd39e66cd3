"""Qwen3-MoE: the native mixture-of-experts block against transformers (the oracle)."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import CheckpointError
from tunelab.models import from_pretrained, save_pretrained
from tunelab.modules.moe import MoE, load_balancing_loss


def test_load_balancing_loss_equals_transformers(make_hf_checkpoint, load_hf_model):
    """The router logits every MoE block keeps give transformers' auxiliary loss
    (output_router_logits=True), and its share of the loss with router_aux_loss_coef (fp32,
    same math: 1e-6)."""
    path = make_hf_checkpoint("qwen3_moe")
    native, hf = from_pretrained(path), load_hf_model(path)
    tokens = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, labels=tokens, output_router_logits=True)
        native(tokens)
    logits = [m.router_logits for m in native.modules() if isinstance(m, MoE)]
    assert len(logits) == 1  # layer 0 is dense (mlp_only_layers)
    aux = load_balancing_loss(logits, native.args.n_experts, native.args.experts_per_token)
    torch.testing.assert_close(aux, ref.aux_loss.float(), atol=1e-6, rtol=1e-6)


def test_greedy_generation_and_lossless_save(make_hf_checkpoint, load_hf_model, tmp_path):
    """KV-cached greedy decoding equals transformers'; the stacked experts save back one tensor
    per expert, as the checkpoint had them, bit for bit."""
    from safetensors.torch import load_file

    from tunelab.modules.generation import generate

    src = make_hf_checkpoint("qwen3_moe")
    native, hf = from_pretrained(src), load_hf_model(src)
    prompt = torch.randint(3, 1024, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(native, prompt, max_new_tokens=20) == ref
    out = save_pretrained(native, tmp_path / "out", source_dir=src)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_paths_without_moe_support_say_so(make_hf_checkpoint):
    with pytest.raises(CheckpointError, match="4-bit loading \\(QLoRA\\) of a mixture-of-experts model") as info:
        from_pretrained(make_hf_checkpoint("qwen3_moe"), quantize="nf4")
    assert "\n" not in str(info.value)
