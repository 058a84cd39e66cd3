"""The native model with the kernels switched on: same logits as transformers, same LoRA loss
and adapter gradients as the unfused path.

fp32 throughout. Logits: 1e-4 absolute, the tolerance of tests/models/test_hf_parity.py (real
mapping errors are O(1e-1)). Loss/gradients, kernels on vs off: 1e-4 relative / 1e-5 absolute
(the same math in a different summation order through two layers).
"""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.kernels import backend, loss_sum
from tunelab.models import from_pretrained
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("kind", ["llama3", "llama3_2", "gemma3"])
def test_logits_match_transformers_with_kernels(kind, triton_backend, make_hf_checkpoint, load_hf_model):
    """gemma3: the 1+w RMSNorm and GeGLU kernels in the model, past its window (16)."""
    path = make_hf_checkpoint(kind)
    model = from_pretrained(path, device=triton_backend)
    tokens = torch.randint(0, 1024, (2, 20 if kind == "gemma3" else 12))
    with torch.no_grad():
        ours = model(tokens.to(triton_backend)).cpu()
        ref = load_hf_model(path)(tokens).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def _lora_model(path, device):
    model = from_pretrained(path, device=device)
    apply_lora(model, TARGETS, rank=4, alpha=8)
    torch.manual_seed(0)
    for p in get_adapter_params(model).values():
        torch.nn.init.normal_(p, std=0.05)  # non-zero B so every adapter term is tested
    set_trainable_params(model)
    return model


def _loss_and_grads(model, batch, name):
    model.zero_grad()
    with backend(name):
        hidden = model(batch["tokens"], position_ids=batch["position_ids"],
                       document_ids=batch["document_ids"], return_hidden=True)  # fmt: skip
        loss = loss_sum(hidden, model.output_weight, batch["labels"])
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in get_adapter_params(model).items()}


def test_lora_packed_loss_and_grads_match_unfused(triton_backend, make_hf_checkpoint):
    device = triton_backend
    model = _lora_model(make_hf_checkpoint("llama3"), device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1024, (2, 10), generator=g)
    labels = torch.randint(0, 1024, (2, 10), generator=g)
    labels[0, :4] = -100
    labels[:, -1] = -100
    # Row 0 packs documents of 6 and 4 tokens; row 1 is one document.
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3], list(range(10))])
    document_ids = torch.tensor([[0] * 6 + [1] * 4, [0] * 10])
    batch = {k: v.to(device) for k, v in dict(
        tokens=tokens, labels=labels, position_ids=position_ids, document_ids=document_ids).items()}  # fmt: skip
    loss_k, grads_k = _loss_and_grads(model, batch, "triton")
    loss_r, grads_r = _loss_and_grads(model, batch, "reference")
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-4, atol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=name)


def test_output_weight_refuses_lora_on_output(make_hf_checkpoint):
    """A fused loss on output_weight would silently drop an adapter on the LM head."""
    model = from_pretrained(make_hf_checkpoint("llama3"))
    apply_lora(model, ["q_proj", "output"], rank=2, alpha=4)
    with pytest.raises(ConfigError, match="output"):
        model.output_weight


def test_compiled_layers_with_kernels_match_eager_reference(device, make_hf_checkpoint):
    """torch.compile per layer (the recipe's compile switch) traces through the kernels'
    autograd functions and gives the unfused eager loss and adapter gradients."""
    if device != "cuda":
        pytest.skip("torch.compile of Triton kernels is checked on the GPU only")
    import torch._dynamo

    model = _lora_model(make_hf_checkpoint("llama3"), device)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 1024, (2, 16), generator=g).to(device)
    labels = torch.randint(0, 1024, (2, 16), generator=g).to(device)
    batch = dict(tokens=tokens, labels=labels, position_ids=None, document_ids=None)
    loss_r, grads_r = _loss_and_grads(model, batch, "reference")
    torch._dynamo.reset()
    for layer in model.layers:
        layer.compile()
    loss_k, grads_k = _loss_and_grads(model, batch, "triton")
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-4, atol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=name)
