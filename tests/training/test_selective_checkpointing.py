"""Selective activation checkpointing: ``activation_checkpointing: k`` checkpoints every k-th
decoder layer only. The checkpointed layers rerun their forward in backward, the others do not,
and the loss and adapter gradients equal those without checkpointing (fp32 on CPU: the rerun
repeats the same kernels on the same inputs, so they agree to rounding, 1e-6)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tunelab.errors import ConfigError
from tunelab.models import build_model, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training.steps import checkpoint_every, wrap_layers


def _model(setting, offload=False):
    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=96, n_layers=4), device="cpu", dtype=torch.float32)
    apply_lora(model, "all-linear", rank=4, alpha=8)
    for p in get_adapter_params(model).values():
        torch.nn.init.normal_(p, std=0.05)
    set_trainable_params(model)
    model = wrap_layers(model, activation_checkpointing=setting, compile_layers=False, offload_activations=offload)
    if offload:  # move the tiny model's activations too (the default skips small tensors)
        next(layer for layer in model.layers if hasattr(layer.forward, "args")).forward.args[0].min_bytes = 0
    return model


def _run(model, tokens):
    calls = [0] * len(model.layers)
    hooks = [layer.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.layers)]
    loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), [p.grad for p in get_adapter_params(model).values()], calls


def test_every_second_layer_is_checkpointed_and_gradients_match():
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    results = {setting: _run(_model(setting), tokens) for setting in (False, True, 2)}
    assert results[False][2] == [1, 1, 1, 1]
    assert results[True][2] == [2, 2, 2, 2]  # forward + the backward's rerun
    assert results[2][2] == [2, 1, 2, 1]  # layers 0 and 2 only
    wrapped = _model(2).layers
    assert [isinstance(layer.forward, functools.partial) and layer.forward.func is checkpoint
            for layer in wrapped] == [True, False, True, False]
    for setting in (True, 2):
        torch.testing.assert_close(results[setting][0], results[False][0], rtol=1e-6, atol=1e-6)
        for got, want in zip(results[setting][1], results[False][1]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_offloading_only_the_checkpointed_layers_gives_the_same_gradients():
    """With offload_activations the checkpointed layers' saved inputs go through the offloader (a
    CPU copy here), the other layers keep theirs: same loss and gradients (1e-5: the kept
    attention hands SDPA grouped k/v, a different summation order)."""
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    plain, offloaded = _run(_model(False), tokens), _run(_model(2, offload=True), tokens)
    assert offloaded[2] == [2, 1, 2, 1]
    torch.testing.assert_close(offloaded[0], plain[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(offloaded[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_setting_values():
    assert [checkpoint_every(v) for v in (False, True, 0, 1, 3)] == [0, 1, 0, 1, 3]
    with pytest.raises(ConfigError, match="activation_checkpointing: -1 is negative"):
        checkpoint_every(-1)
    with pytest.raises(ConfigError, match="offload_activations: true needs activation_checkpointing"):
        checkpoint_every(0, offload_activations=True)
