"""PEFT-format adapters: parity with Hugging Face PEFT (the oracle) in both directions.

Tolerance: logits are compared with max abs diff <= 1e-4. Both sides run in fp32 on CPU with
the same weights and the same LoRA math (W0 x + (alpha/r) B A x); they differ only in kernel
and summation order (SDPA vs. our attention, how RoPE and the adapter add are ordered), which
moves logits of magnitude ~1 by ~1e-6. A wrong scaling, a missing or transposed adapter or a
mis-mapped layer moves them by >= 1e-2.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError, ConfigError
from tunelab.models.adapters import load_adapter, save_adapter
from tunelab.models.checkpoint import from_pretrained
from tunelab.modules.peft import (
    LoRALinear,
    apply_lora,
    apply_lora_to_modules,
    disable_adapters,
    get_adapter_params,
    merge_lora_state_dict,
    set_trainable_params,
)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(make_hf_checkpoint):
    return make_hf_checkpoint("llama3")


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 1024, (2, 12), generator=g)


def _randomize_b(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in get_adapter_params(model).items():
            if name.endswith("lora_b.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _lora_model(ckpt, targets, rank=4, alpha=8.0):
    model = from_pretrained(ckpt, dtype=torch.float32).eval()
    apply_lora(model, targets, rank=rank, alpha=alpha)
    _randomize_b(model)
    return model


@pytest.mark.parametrize("targets", [ALL_TARGETS, ["q_proj", "v_proj", "output"]])
def test_saved_adapter_loads_in_peft(ckpt, load_hf_model, tokens, tmp_path, targets):
    from peft import PeftModel

    model = _lora_model(ckpt, targets)
    with torch.no_grad():
        ours = model(tokens)
        with disable_adapters(model):
            base = model(tokens)
    assert _max_diff(ours, base) > 1e-2  # the adapter matters

    out = save_adapter(
        model, tmp_path / "adapter", base_model_name_or_path=str(ckpt),
        rank=4, alpha=8.0, dropout=0.0, targets=targets,
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    want_modules = sorted("lm_head" if t == "output" else t for t in targets)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.0)
    assert cfg["target_modules"] == want_modules and cfg["bias"] == "none"
    keys = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    v_b = keys["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert v_b.dtype == torch.float32
    if "output" in targets:
        assert keys["base_model.model.lm_head.lora_B.weight"].shape == (1024, 4)

    peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), out).eval()
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    assert _max_diff(ours, theirs) <= ATOL


def test_partial_layers_saved_as_full_paths(ckpt, load_hf_model, tokens, tmp_path):
    # LoRA on one layer only: a leaf name would make PEFT adapt every q_proj, so the config
    # must list the exact module path.
    from peft import PeftModel

    model = from_pretrained(ckpt, dtype=torch.float32).eval()
    apply_lora_to_modules(model, ["layers.1.attn.q_proj"], rank=2, alpha=2)
    _randomize_b(model, std=0.5)
    out = save_adapter(model, tmp_path / "a", base_model_name_or_path=str(ckpt))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), out).eval()
    with torch.no_grad():
        ours, theirs = model(tokens), peft_model(tokens).logits
        with disable_adapters(model):
            assert _max_diff(ours, model(tokens)) > 1e-3
    assert _max_diff(ours, theirs) <= ATOL
    again = load_adapter(from_pretrained(ckpt, dtype=torch.float32), out)
    assert list(get_adapter_params(again)) == list(get_adapter_params(model))


def _peft_adapter(ckpt, load_hf_model, out_dir, target_modules):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=target_modules, init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(load_hf_model(ckpt), config).eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("target_modules", [ALL_TARGETS, "all-linear"])
def test_peft_adapter_loads_in_tunelab(ckpt, load_hf_model, tokens, tmp_path, target_modules):
    peft_model = _peft_adapter(ckpt, load_hf_model, tmp_path / "peft", target_modules)
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    model = load_adapter(from_pretrained(ckpt, dtype=torch.float32).eval(), tmp_path / "peft")
    assert len(get_adapter_params(model)) == 2 * 7 * 2
    lora = model.layers[0].attn.q_proj
    assert isinstance(lora, LoRALinear) and lora.rank == 8 and lora.scaling == 2.0
    with torch.no_grad():
        ours = model(tokens)
    assert _max_diff(ours, theirs) <= ATOL


def test_load_accepts_default_name_and_all_linear(ckpt, load_hf_model, tokens, tmp_path):
    peft_model = _peft_adapter(ckpt, load_hf_model, tmp_path / "peft", ALL_TARGETS)
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    d = tmp_path / "peft"
    tensors = load_file(d / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}
    save_file(renamed, d / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = "all-linear"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = load_adapter(from_pretrained(ckpt, dtype=torch.float32).eval(), d)
    with torch.no_grad():
        assert _max_diff(model(tokens), theirs) <= ATOL


def test_save_load_roundtrip_is_exact(ckpt, tmp_path):
    model = _lora_model(ckpt, ALL_TARGETS + ["output"], rank=2, alpha=3.0)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="x")
    again = load_adapter(from_pretrained(ckpt, dtype=torch.float32), tmp_path / "a")
    want, got = get_adapter_params(model), get_adapter_params(again)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k])
    assert again.output.scaling == 1.5


@pytest.mark.parametrize("targets", [ALL_TARGETS, ALL_TARGETS + ["output"]])
def test_merge_and_disable_on_real_model(ckpt, tokens, targets):
    base_model = from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        base = base_model(tokens)
    model = _lora_model(ckpt, targets)
    with torch.no_grad():
        adapted = model(tokens)
        merged = merge_lora_state_dict(model)
        assert set(merged) == set(base_model.state_dict())
        assert torch.equal(model(tokens), adapted)  # merging left the model untouched
        base_model.load_state_dict(merged)
        assert _max_diff(base_model(tokens), adapted) <= ATOL
        with disable_adapters(model):
            assert _max_diff(model(tokens), base) <= 1e-6
        assert torch.equal(model(tokens), adapted)


def test_trainable_params_on_real_model(ckpt, tokens):
    model = _lora_model(ckpt, ALL_TARGETS).train()
    n = set_trainable_params(model)
    params = get_adapter_params(model)
    assert n == sum(p.numel() for p in params.values())
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in params), name


def test_tied_model_has_no_output_target(make_hf_checkpoint):
    model = from_pretrained(make_hf_checkpoint("llama3_2"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="'output'.*valid: down_proj"):
        apply_lora(model, ["q_proj", "output"], rank=2, alpha=4)


# ---------------------------------------------------------------- bad inputs


def _saved(ckpt, tmp_path):
    model = _lora_model(ckpt, ["q_proj", "v_proj"])
    return save_adapter(model, tmp_path / "a", base_model_name_or_path="x")


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _load_error(ckpt, d) -> str:
    model = from_pretrained(ckpt, dtype=torch.float32)
    before = set(model.state_dict())
    with pytest.raises(CheckpointError) as err:
        load_adapter(model, d)
    assert set(model.state_dict()) == before  # a failed load changes nothing
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_config(ckpt, tmp_path):
    d = _saved(ckpt, tmp_path)
    (d / "adapter_config.json").unlink()
    assert "adapter_config.json" in _load_error(ckpt, d)
    assert "does not exist" in _load_error(ckpt, tmp_path / "nope")


def test_missing_weights(ckpt, tmp_path):
    d = _saved(ckpt, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors" in _load_error(ckpt, d)


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(peft_type="IA3"), "peft_type is 'IA3'"),
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(bias="all"), "bias='all'"),
        (dict(init_lora_weights="pissa"), "pissa"),
        (dict(r=8), "lora_A.weight has shape [4, 64], expected [8, 64]"),
        (dict(target_modules=["q_proj"]), "v_proj"),
        (dict(target_modules=["q_proj", "v_proj", "k_proj"]), "no adapter weights"),
    ],
)
def test_bad_config(ckpt, tmp_path, changes, needle):
    d = _saved(ckpt, tmp_path)
    _edit_config(d, **changes)
    msg = _load_error(ckpt, d)
    assert needle in msg and "adapter_" in msg


def test_bad_tensors(ckpt, tmp_path):
    d = _saved(ckpt, tmp_path)
    path = d / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    good = dict(tensors)
    tensors[key] = torch.zeros(5, 4)
    save_file(tensors, path)
    msg = _load_error(ckpt, d)
    assert key in msg and "[5, 4]" in msg and str(path) in msg

    tensors = dict(good)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, path)
    assert "layers.7" in _load_error(ckpt, d)

    tensors = dict(good)
    del tensors[key]
    save_file(tensors, path)
    assert "lora_B" in _load_error(ckpt, d)
