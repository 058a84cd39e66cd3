"""LoRALinear and the LoRA helpers on small hand-made modules (no checkpoint needed).

Tolerances: everything is fp32 on CPU. Where two computations do the same arithmetic in the
same order the result is compared exactly; where the order differs (merged W vs. W0 plus a
separate low-rank path) we allow 1e-5 absolute, far above fp32 rounding for these sizes
(|y| ~ 1, eps 1.2e-7 times a few dozen accumulated terms) and far below any real bug.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.modules.peft import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    get_adapter_params,
    merge_lora_,
    merge_lora_state_dict,
    set_trainable_params,
)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyAttn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d // 2, bias=False)
        self.v_proj = nn.Linear(d, d // 2, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        k = self.k_proj(x)
        v = self.v_proj(x)
        return self.o_proj(self.q_proj(x) * torch.cat([k, v], -1).tanh())


class TinyMLP(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyModel(nn.Module):
    """Same leaf names as the native decoder: layers.{i}.attn.*, layers.{i}.mlp.*, output."""

    def __init__(self, d: int = 16, h: int = 24, vocab: int = 32, n_layers: int = 2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(attn=TinyAttn(d), mlp=TinyMLP(d, h))) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = x + layer["attn"](x)
            x = x + layer["mlp"](x)
        return self.output(self.norm(x))


def _randomize_b(model: nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for name, p in get_adapter_params(model).items():
            if name.endswith("lora_b.weight"):
                p.normal_(0, std)


# ---------------------------------------------------------------- LoRALinear


def test_forward_matches_formula():
    torch.manual_seed(0)
    layer = LoRALinear(12, 7, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    x = torch.randn(2, 5, 12)
    w0, a, b = layer.weight, layer.lora_a.weight, layer.lora_b.weight
    expected = x @ w0.T + (6.0 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert layer.scaling == 2.0
    assert layer(x).shape == (2, 5, 7)


def test_zero_b_equals_base_and_init():
    torch.manual_seed(0)
    layer = LoRALinear(10, 6, rank=4, alpha=8)
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    # kaiming-uniform(a=sqrt(5)) as nn.Linear: bound = 1/sqrt(in_dim)
    bound = 1 / 10**0.5
    assert layer.lora_a.weight.abs().max() <= bound and layer.lora_a.weight.std() > 0
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), x @ layer.weight.T)


def test_grads_only_to_adapter():
    torch.manual_seed(0)
    layer = LoRALinear(8, 8, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    assert not layer.weight.requires_grad
    layer(torch.randn(4, 8)).square().sum().backward()
    assert layer.weight.grad is None
    assert layer.lora_a.weight.grad is not None and layer.lora_a.weight.grad.abs().sum() > 0
    assert layer.lora_b.weight.grad is not None and layer.lora_b.weight.grad.abs().sum() > 0


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(16, 16, rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    x = torch.randn(64, 16)
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    a, b = layer.lora_a.weight, layer.lora_b.weight
    expected = x @ layer.weight.T + layer.scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(y1, expected, rtol=0, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    # dropout acts on the adapter input only: the base path is untouched
    with disable_adapters(layer):
        assert torch.equal(layer(x), x @ layer.weight.T)


def test_from_linear_reuses_weight_and_meta():
    lin = nn.Linear(6, 4, bias=False)
    lora = LoRALinear.from_linear(lin, rank=2, alpha=2)
    assert lora.weight is lin.weight and not lora.weight.requires_grad
    with torch.device("meta"):
        meta_lin = nn.Linear(6, 4, bias=False)
    meta_lora = LoRALinear.from_linear(meta_lin, rank=2, alpha=2)
    assert meta_lora.weight.is_meta and meta_lora.lora_a.weight.is_meta
    biased = nn.Linear(6, 4, bias=True)  # Qwen2's q/k/v: the bias is kept, frozen, in the base path
    lora = LoRALinear.from_linear(biased, rank=2, alpha=2)
    assert lora.bias is biased.bias and not lora.bias.requires_grad
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), biased(x))  # a fresh adapter (B = 0) is the base layer


def test_adapter_dtype_fp32_on_bf16_base():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    lora = LoRALinear.from_linear(lin, rank=2, alpha=2, adapter_dtype=torch.float32)
    assert lora.lora_a.weight.dtype == torch.float32
    y = lora(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert lora.merged_weight().dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs", [dict(rank=0, alpha=1), dict(rank=2, alpha=0), dict(rank=2, alpha=1, dropout=1.0)]
)
def test_bad_hparams(kwargs):
    with pytest.raises(ConfigError):
        LoRALinear(4, 4, **kwargs)


# ---------------------------------------------------------------- helpers on a model


def test_apply_lora_targets_and_params():
    torch.manual_seed(0)
    model = TinyModel()
    q_weight = model.layers[0]["attn"].q_proj.weight
    apply_lora(model, ALL_TARGETS, rank=4, alpha=8)
    assert isinstance(model.layers[0]["attn"].q_proj, LoRALinear)
    assert model.layers[1]["mlp"].down_proj.weight.shape == (16, 24)
    assert model.layers[0]["attn"].q_proj.weight is q_weight  # no copy
    assert isinstance(model.output, nn.Linear) and not isinstance(model.output, LoRALinear)
    params = get_adapter_params(model)
    assert len(params) == 2 * 7 * 2
    assert "layers.0.attn.q_proj.lora_a.weight" in params
    assert "layers.1.mlp.down_proj.lora_b.weight" in params
    # state-dict names: base unchanged, adapters added
    keys = set(model.state_dict())
    assert "layers.0.attn.q_proj.weight" in keys and "layers.0.attn.q_proj.lora_a.weight" in keys

    n = set_trainable_params(model)
    assert n == sum(p.numel() for p in params.values())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(params)


def test_apply_lora_output_and_all_linear():
    model = apply_lora(TinyModel(), ["q_proj", "output"], rank=2, alpha=4)
    assert isinstance(model.output, LoRALinear)
    assert not isinstance(model.layers[0]["attn"].k_proj, LoRALinear)
    model = apply_lora(TinyModel(), "all-linear", rank=2, alpha=4)
    assert len(get_adapter_params(model)) == 2 * 7 * 2  # all-linear skips the output head


def test_apply_lora_unknown_target_lists_valid():
    with pytest.raises(ConfigError) as err:
        apply_lora(TinyModel(), ["q_proj", "qproj", "wq"], rank=2, alpha=4)
    msg = str(err.value)
    assert "'qproj'" in msg and "'wq'" in msg and "did you mean 'q_proj'" in msg
    assert "down_proj" in msg and "output" in msg and "lora_a" not in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError):
        apply_lora(TinyModel(), "everything", rank=2, alpha=4)


def test_apply_lora_on_meta():
    with torch.device("meta"):
        model = TinyModel()
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    assert all(p.is_meta for p in get_adapter_params(model).values())


def test_disable_adapters_restores_even_on_error():
    torch.manual_seed(0)
    model = TinyModel().eval()
    tokens = torch.randint(0, 32, (2, 5))
    base = model(tokens)
    apply_lora(model, ALL_TARGETS, rank=4, alpha=8)
    _randomize_b(model)
    with_adapter = model(tokens)
    assert (with_adapter - base).abs().max() > 1e-3
    with disable_adapters(model):
        assert torch.equal(model(tokens), base)
    assert torch.equal(model(tokens), with_adapter)
    with pytest.raises(RuntimeError):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert torch.equal(model(tokens), with_adapter)


def test_merge_state_dict_and_in_place():
    torch.manual_seed(0)
    model = TinyModel().eval()
    tokens = torch.randint(0, 32, (2, 5))
    base_keys = set(model.state_dict())
    apply_lora(model, ALL_TARGETS + ["output"], rank=4, alpha=8)
    _randomize_b(model)
    expected = model(tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    merged = merge_lora_state_dict(model)
    assert set(merged) == base_keys
    for k, v in model.state_dict().items():  # model untouched
        assert torch.equal(v, before[k])
    plain = TinyModel().eval()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(tokens), expected, rtol=0, atol=1e-5)

    merge_lora_(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(model(tokens), expected, rtol=0, atol=1e-5)


def test_merge_state_dict_keeps_base_dtype():
    torch.manual_seed(0)
    model = TinyModel().to(torch.bfloat16)
    apply_lora(model, ["q_proj"], rank=2, alpha=4, adapter_dtype=torch.float32)
    _randomize_b(model)
    merged = merge_lora_state_dict(model)
    w = merged["layers.0.attn.q_proj.weight"]
    assert w.dtype == torch.bfloat16
    m = model.layers[0]["attn"].q_proj
    ref = (m.weight.float() + 2.0 * m.lora_b.weight @ m.lora_a.weight).to(torch.bfloat16)
    assert torch.equal(w, ref)
