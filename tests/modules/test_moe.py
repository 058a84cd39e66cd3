"""Qwen3-MoE: the native mixture-of-experts block against transformers (the oracle)."""

from __future__ import annotations

import pytest
import torch

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


def test_nf4_experts_run_one_expert_at_a_time(make_hf_checkpoint):
    """QLoRA on Qwen3-MoE: each expert's weight is its own NF4 weight (byte-identical to
    quantizing that expert alone), the model's logits equal the dense model carrying the
    dequantized experts, and state_dict() presents the dense stack under the native name."""
    from tunelab.modules.nf4 import NF4ExpertWeights, to_nf4

    src = make_hf_checkpoint("qwen3_moe")
    q = from_pretrained(src, quantize="nf4", dtype=torch.float32)
    stack = q.layers[1].mlp.experts.gate_up_proj
    assert isinstance(stack, NF4ExpertWeights) and stack.shape == (4, 96, 64)
    dense = from_pretrained(src)
    want = to_nf4(dense.layers[1].mlp.experts.gate_up_proj[2].detach())
    assert torch.equal(stack.experts[2].codes, want.codes)
    state = q.state_dict()
    assert state["layers.1.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
    dense.load_state_dict(state)
    tokens = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(q(tokens), dense(tokens), atol=1e-5, rtol=1e-5)


def test_expert_lora_matches_its_merge_and_survives_the_peft_layout(make_hf_checkpoint, tmp_path):
    """LoRA on the experts (lora.targets 'experts'): the model with random adapters equals the
    model whose expert weights hold W + scaling * B @ A (merge_lora_state_dict), and the adapter
    saved in PEFT's target_parameters layout loads back to the same logits (fp32, 1e-5)."""
    from tunelab.models.adapters import load_adapter, save_adapter
    from tunelab.modules.peft import apply_lora, expert_lora_modules, get_adapter_params, merge_lora_state_dict

    src = make_hf_checkpoint("qwen3_moe")
    model = apply_lora(from_pretrained(src), ["q_proj", "experts"], rank=2, alpha=4)
    assert len(list(expert_lora_modules(model))) == 2  # gate_up and down of the one MoE layer
    torch.manual_seed(0)
    for p in get_adapter_params(model).values():
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(2))
    merged = from_pretrained(src)
    merged.load_state_dict(merge_lora_state_dict(model))
    with torch.no_grad():
        want = model(tokens)
        assert (want - from_pretrained(src)(tokens)).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(merged(tokens), want, atol=1e-5, rtol=1e-5)
        save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(src))
        torch.testing.assert_close(load_adapter(from_pretrained(src), tmp_path / "adapter")(tokens), want,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_lora", [False, True])
def test_grouped_path_equals_the_reference(with_lora):
    """The grouped GEMM path (torch._grouped_mm, which also runs on CPU) against the per-expert
    loop: outputs and the gradients of x, the expert weights and the expert LoRA factors, fp32
    (the same products summed in another order: 1e-5), with an expert that gets no token."""
    from tunelab.modules.moe import Experts
    from tunelab.modules.peft import apply_expert_lora

    torch.manual_seed(0)
    experts = Experts(4, 32, 24)
    if with_lora:
        apply_expert_lora(experts, rank=8, alpha=16)
        for p in (experts.gate_up_lora.lora_b, experts.down_lora.lora_b):
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(10, 32)
    ids = torch.randint(0, 3, (10, 2))  # expert 3 idle
    w = torch.rand(10, 2)
    results = []
    for path in (experts.forward_reference, experts.forward_grouped):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        out = path(xi, ids, w)
        out.backward(torch.randn(10, 32, generator=torch.Generator().manual_seed(1)))
        results.append((out, xi.grad, *[p.grad.clone() for p in experts.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gpt_oss_hub_config_loads_the_same_model(make_hf_checkpoint, load_hf_model, tmp_path):
    """gpt-oss's hub config spelling (rope_scaling of type yarn, no layer_types: sliding and full
    alternate) loads to the same model."""
    import json
    import shutil

    src = make_hf_checkpoint("gpt_oss")
    native = from_pretrained(src)
    assert [native.args.is_sliding(i) for i in range(2)] == [True, False] and native.args.attn_sinks
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    config = json.loads((hub / "config.json").read_text())
    params = config.pop("rope_parameters")
    config.pop("layer_types")
    config.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
    (hub / "config.json").write_text(json.dumps(config))
    assert from_pretrained(hub).args == native.args


def test_gpt_oss_packed_rows_equal_separate_documents(make_hf_checkpoint):
    """Two documents packed in one row (sinks with the document mask, one of them past the
    window of 8) give each document's logits alone (fp32, 1e-5)."""
    model = from_pretrained(make_hf_checkpoint("gpt_oss"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 1024, (1, 12), generator=g), torch.randint(0, 1024, (1, 7), generator=g)
    tokens = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(7)])[None]
    documents = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(7, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(tokens, position_ids=positions, document_ids=documents)
        torch.testing.assert_close(packed[:, :12], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 12:], model(b), atol=1e-5, rtol=1e-5)
