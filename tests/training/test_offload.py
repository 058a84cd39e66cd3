"""Activation offloading of the checkpointed layer inputs (training/offload.py).

fp32 on CPU: offloading only moves saved tensors between buffers, so losses and gradients must
be bit-identical to plain activation checkpointing. The CUDA test (skipped on CPU) checks the
same with real pinned-memory copies on side streams, and that the device memory held between
forward and backward drops by the offloaded inputs.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.models import build_model, tiny
from tunelab.modules.peft import get_adapter_params
from tunelab.training.steps import wrap_layers


def _grads(model, tokens):
    loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in get_adapter_params(model).items()}


def test_offloaded_inputs_give_identical_gradients_over_two_steps(tiny_lora_model):
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, offloaded = tiny_lora_model("cpu", False), tiny_lora_model("cpu", True)
    offloader = offloaded.layers[0].forward.args[0]
    offloader.min_bytes = 0  # the tiny model's inputs are a few KiB
    for _ in range(2):  # the second step reuses the host buffers of the first
        loss_a, grads_a = _grads(plain, tokens)
        loss_b, grads_b = _grads(offloaded, tokens)
        assert torch.equal(loss_a, loss_b)
        for k in grads_a:
            assert torch.equal(grads_a[k], grads_b[k]), k
    # one input per layer, except layer 0's: the frozen embedding's output is not in the graph
    n_layers = len(offloaded.layers)
    assert offloader.offloaded_bytes == (n_layers - 1) * tokens.numel() * offloaded.args.dim * 4
    assert all(h is None for h in offloader._handles)  # backward consumed every offloaded input


def test_small_and_non_grad_tensors_stay():
    from tunelab.training.offload import ActivationOffloader

    off = ActivationOffloader(min_bytes=1 << 10)
    small = torch.randn(4, requires_grad=True)
    ids = torch.arange(4096)
    assert off._pack(small) is small and off._pack(ids) is ids


def test_offload_needs_activation_checkpointing():
    model = build_model(tiny(vocab_size=96), device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match="offload_activations"):
        wrap_layers(model, activation_checkpointing=False, compile_layers=False, offload_activations=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned-memory offload runs on CUDA")
def test_cuda_offload_matches_and_frees_device_memory(tiny_lora_model):
    tokens = torch.randint(0, 96, (4, 512), device="cuda")
    held = {}
    for offload in (False, True):
        model = tiny_lora_model("cuda", offload)
        if offload:
            model.layers[0].forward.args[0].min_bytes = 0
        _grads(model, tokens)  # warm-up (allocator, host buffers)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens).float().logsumexp(-1).mean()
        torch.cuda.synchronize()
        held[offload] = torch.cuda.memory_allocated() - before
        loss.backward()
        held[f"grads{offload}"] = {k: p.grad.clone() for k, p in get_adapter_params(model).items()}
    for k, g in held["gradsFalse"].items():
        torch.testing.assert_close(held["gradsTrue"][k], g, rtol=0, atol=0)
    layer_input = tokens.numel() * model.args.dim * 4
    assert held[False] - held[True] >= (len(model.layers) - 2) * layer_input  # all but layer 0's (and slack)
