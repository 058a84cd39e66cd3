"""RMSNorm and RoPE against transformers' Llama pieces (bitwise where the math is the same)."""

from __future__ import annotations

import torch

from tunelab.modules import RMSNorm, RotaryEmbedding, apply_rope


def test_rms_norm_matches_hf_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, ref = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16) * 30
    # Same fp32 statistics, same cast-then-scale order: identical bits.
    assert torch.equal(ours(x), ref(x))
    assert ours(x).dtype == torch.bfloat16


def test_rope_matches_hf():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(scaling, rope_theta=5e5))
    q, k = torch.randn(2, 4, 300, 16), torch.randn(2, 2, 300, 16)
    pos = torch.arange(300)[None].repeat(2, 1)
    cos, sin = RotaryEmbedding(16, 5e5, scaling)(pos, torch.float32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(q, pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    for a, b in zip(apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, ref_cos, ref_sin)):
        assert torch.equal(a, b)
