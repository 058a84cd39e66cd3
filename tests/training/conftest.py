"""Shared pieces of the training tests."""

from __future__ import annotations

import pytest
import torch

from tunelab.models import build_model, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training.steps import wrap_layers


def _tiny_lora_model(device, offload: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny(vocab_size=96), device=device, dtype=torch.float32)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    for p in get_adapter_params(model).values():  # lora_b starts at zero: make the adapters act
        torch.nn.init.normal_(p, std=0.02)
    set_trainable_params(model)
    return wrap_layers(model, activation_checkpointing=True, compile_layers=False, offload_activations=offload)


@pytest.fixture
def tiny_lora_model():
    """``make(device, offload=False, seed=0)``: a tiny fp32 Llama, LoRA r4 on q/v/down with
    non-zero adapters, activation checkpointing per layer (optionally offloaded)."""
    return _tiny_lora_model
