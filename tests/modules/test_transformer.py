"""Native decoder behaviour: packing masks, KV-cache decoding, hidden states, buffers."""

from __future__ import annotations

import pytest
import torch

from tunelab.models import build_model, from_pretrained, tiny


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny(n_layers=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    with torch.no_grad():
        for p in m.parameters():  # default init leaves norms at 1; randomise everything
            p.normal_(0, 0.2)
    return m.eval()


def test_state_dict_names(model):
    names = set(model.state_dict())
    assert "tok_embeddings.weight" in names and "norm.weight" in names and "output.weight" in names
    for leaf in ["attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp_norm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
        assert f"layers.1.{leaf}.weight" in names
    assert not any("inv_freq" in n or "cache" in n for n in names)
    assert len(names) == 3 + 2 * 9


def test_packed_documents_equal_separate(model):
    """Two documents in one row (document_ids + restarting positions) == each alone.

    Tolerance 1e-5: same fp32 math on the same rows; only the masked-out keys differ.
    """
    a = torch.randint(0, 1024, (1, 15))
    b = torch.randint(0, 1024, (1, 25))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 15 + [1] * 25])
    pos = torch.cat([torch.arange(15), torch.arange(25)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, document_ids=doc)
        alone_a, alone_b = model(a), model(b)
    assert (out[:, :15] - alone_a).abs().max() <= 1e-5
    assert (out[:, 15:] - alone_b).abs().max() <= 1e-5
    # Without the mask the second document would see the first: the test can fail.
    with torch.no_grad():
        leaky = model(packed, position_ids=pos)
    assert (leaky[:, 15:] - alone_b).abs().max() > 1e-3


def test_incremental_decoding_equals_full_forward(model):
    """Prefill + one token at a time through the KV cache == one full forward (<= 1e-5)."""
    tokens = torch.randint(0, 1024, (2, 24))  # longer than original_max_position_embeddings
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, max_seq_len=32)
        assert model.caches_are_enabled()
        steps = [model(tokens[:, :10], input_pos=torch.arange(10))]
        for i in range(10, 24):
            steps.append(model(tokens[:, i : i + 1], input_pos=torch.tensor([i])))
        inc = torch.cat(steps, dim=1)
        model.reset_caches()
        again = model(tokens[:, :10], input_pos=torch.arange(10))
        model.teardown_caches()
    assert not model.caches_are_enabled()
    assert (inc - full).abs().max() <= 1e-5
    assert (again - full[:, :10]).abs().max() <= 1e-5


def test_cache_requires_input_pos(model):
    model.setup_caches(1, 8)
    try:
        with pytest.raises(ValueError, match="input_pos"):
            model(torch.zeros(1, 4, dtype=torch.long))
    finally:
        model.teardown_caches()


def test_return_hidden_times_output_weight_is_logits(model):
    tokens = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        logits = model(tokens)
    assert hidden.shape == (2, 12, model.args.dim)
    assert torch.allclose(hidden @ model.output_weight.T, logits, atol=1e-6)


def test_meta_build_then_to_empty_recomputes_rope():
    args = tiny()
    real = build_model(args)
    meta = build_model(args, device="meta")
    assert meta.rope.inv_freq.is_meta
    meta.to_empty(device="cpu")
    assert torch.equal(meta.rope.inv_freq, real.rope.inv_freq)
    real.to(torch.bfloat16)  # casting the model must not round the frequencies
    assert real.rope.inv_freq.dtype == torch.float32
    assert torch.equal(real.rope.inv_freq, meta.rope.inv_freq)


def test_backward_through_packed_forward(make_hf_checkpoint):
    model = from_pretrained(make_hf_checkpoint("llama3")).train()
    tokens = torch.randint(0, 1024, (2, 16))
    doc = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    loss = model(tokens, document_ids=doc).logsumexp(-1).mean()
    loss.backward()
    assert model.layers[0].attn.q_proj.weight.grad is not None
    assert torch.isfinite(model.layers[0].attn.q_proj.weight.grad).all()


def test_output_module_is_called():
    """A layer swapped in for `output` (LoRA, NF4) must be used for the logits."""
    model = build_model(tiny())
    model.output = torch.nn.Linear(64, 1024, bias=False)
    torch.nn.init.zeros_(model.output.weight)
    assert model(torch.randint(0, 1024, (1, 5))).abs().max() == 0
