"""Shared fixtures: tiny random Llama checkpoints written by transformers (the oracle).

Each ``make_hf_checkpoint(kind)`` call returns a folder written by
``LlamaForCausalLM.save_pretrained`` (transformers' own layout), so every test that reads one
exercises the real format, not our idea of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Small but not degenerate: GQA needs n_heads > n_kv_heads, rope needs an even head_dim.
BASE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> overrides of BASE; rope settings are passed in the transformers-5 form.
KINDS = {
    "llama2": dict(rope_theta=10000.0),
    "llama3": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama3_1": dict(
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama3_2": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
}


def _build_hf_model(kind: str, seed: int, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(BASE)
    cfg.update(KINDS[kind])
    cfg.update(overrides)
    rope_theta = cfg.pop("rope_theta")
    rope_scaling = cfg.pop("rope_scaling", None)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters = dict(rope_scaling, rope_theta=rope_theta)
    config = LlamaConfig(rope_parameters=rope_parameters, **cfg)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # transformers initialises norms to ones; perturb them so a wrong norm mapping shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory):
    """Factory: ``make_hf_checkpoint(kind="llama3", seed=0, **config_overrides) -> Path``.

    kinds: llama2 (MHA, theta 1e4), llama3 (GQA, theta 5e5), llama3_1 (llama3 rope scaling),
    llama3_2 (tied embeddings). Written in fp32 by transformers' save_pretrained. Results are
    cached per argument set for the session; treat the folder as read-only (copy it to modify).
    """
    cache: dict = {}

    def make(kind: str = "llama3", seed: int = 0, **overrides) -> Path:
        key = (kind, seed, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf_{kind}")
            model = _build_hf_model(kind, seed, **overrides)
            model.save_pretrained(out, safe_serialization=True)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def load_hf_model():
    """``load_hf_model(path) -> LlamaForCausalLM`` in fp32, eval mode (the oracle)."""

    def load(path):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    return load
