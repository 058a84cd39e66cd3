"""save_pretrained / from_pretrained round trips through transformers, sharding, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError
from tunelab.models import (
    build_model,
    from_pretrained,
    hf_to_native_key,
    load_hf_state_dict,
    native_to_hf_key,
    save_pretrained,
    tiny,
)


def _same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["llama3_1", "llama3_2", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_mm", "phi3",
                                  "phi3_longrope", "qwen3_moe", "gpt_oss"])
def test_save_then_transformers_loads_identical(kind, make_hf_checkpoint, load_hf_model, tmp_path):
    """Every family's save round trip is lossless: transformers loads the saved folder with
    bit-identical weights (and so logits) to the source folder."""
    src = make_hf_checkpoint(kind)
    native = from_pretrained(src)
    out = save_pretrained(native, tmp_path / "out", source_dir=src)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert (out / "generation_config.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # an image-text config keeps its token ids there
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2

    hf_src, hf_out = load_hf_model(src), load_hf_model(out)
    _same_tensors(hf_src.state_dict(), hf_out.state_dict())
    if kind == "llama3_2":  # tied: lm_head is not written
        with __import__("safetensors").safe_open(out / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()
    tokens = torch.randint(0, 1000, (2, 80))  # (below gemma3_mm's image-token ids)
    with torch.no_grad():
        assert torch.equal(hf_out(tokens).logits, hf_src(tokens).logits)
        assert (native(tokens) - hf_out(tokens).logits).abs().max() <= 1e-4


def test_sharded_save_and_round_trip(make_hf_checkpoint, load_hf_model, tmp_path):
    src = make_hf_checkpoint("llama3")
    native = from_pretrained(src)
    out = save_pretrained(native, tmp_path / "sharded", source_dir=src, max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    for s in shards:
        from safetensors import safe_open

        with safe_open(out / s, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in native.state_dict().values())

    # native -> HF -> native is lossless, and transformers reads the shards too.
    _same_tensors(from_pretrained(out).state_dict(), native.state_dict())
    _same_tensors(load_hf_model(out).state_dict(), load_hf_model(src).state_dict())

    # Saving again unsharded into the same folder leaves no stale shards behind.
    save_pretrained(native, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_save_state_dict_without_source_uses_hub_rope_layout(load_hf_model, tmp_path):
    args = tiny(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    model = build_model(args).eval()
    out = save_pretrained(model.state_dict(), tmp_path / "sd", args=args, dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in cfg
    assert cfg["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    # transformers picks up the llama3 scaling from the hub layout: same logits past 16 positions.
    model = model.to(torch.bfloat16).float()
    tokens = torch.randint(0, 1024, (1, 40))
    with torch.no_grad():
        assert (model(tokens) - load_hf_model(out)(tokens).logits).abs().max() <= 1e-4


def test_aux_files_copied(make_hf_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(make_hf_checkpoint("llama3"), src)
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "original").mkdir()
    (src / "original" / "tokenizer.model").write_bytes(b"x")
    out = save_pretrained(from_pretrained(src), tmp_path / "out", source_dir=src)
    for rel in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "original/tokenizer.model"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()


def test_save_refuses_lora_weights(tmp_path):
    args = tiny()
    sd = build_model(args).state_dict()
    sd["layers.0.attn.q_proj.lora_a.weight"] = torch.zeros(4, 64)
    with pytest.raises(CheckpointError, match="merge"):
        save_pretrained(sd, tmp_path / "x", args=args)


def test_key_conversion_round_trip():
    sd = build_model(tiny(), device="meta").state_dict()
    for k in sd:
        assert hf_to_native_key(native_to_hf_key(k)) == k
    assert native_to_hf_key("layers.3.mlp_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert native_to_hf_key("output.weight") == "lm_head.weight"
    with pytest.raises(KeyError):
        native_to_hf_key("layers.0.attn.q_proj.lora_a.weight")


def test_load_hf_state_dict_native_names(make_hf_checkpoint):
    sd = load_hf_state_dict(make_hf_checkpoint("llama3_2"), dtype=torch.bfloat16)
    assert "tok_embeddings.weight" in sd and "output.weight" not in sd
    assert sd["norm.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------- bad inputs
def _copy(make_hf_checkpoint, tmp_path, kind="llama3"):
    dst = tmp_path / "ckpt"
    shutil.copytree(make_hf_checkpoint(kind), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_dir(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")


def test_missing_config(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    (d / "config.json").unlink()
    assert "has no config.json" in _error(d) and "tune download" in _error(d)
    # folders users pass by mistake get told what they are and what to pass instead
    adapter = tmp_path / "run" / "step_9" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert "PEFT adapter folder" in _error(adapter) and "adapter_dir" in _error(adapter)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/base-8b"}')
    assert "its base model (/models/base-8b) as checkpoint_dir" in _error(adapter)
    for step in (9, 10):  # the newest by number, not by name
        (tmp_path / "run" / f"step_{step}" / "merged").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / f"step_{step}" / "merged" / "config.json").write_text("{}")
    assert "run's output_dir" in _error(tmp_path / "run") and "step_10/merged" in _error(tmp_path / "run")


def test_unknown_model_type(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    _edit_config(d, model_type="gpt2")  # (mistral is a supported family since issue 22 began)
    assert "model_type='gpt2'" in _error(d)


def test_attention_bias(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    _edit_config(d, attention_bias=True)
    assert "attention_bias=True" in _error(d)


def test_unsupported_rope_type(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    _edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0})
    assert "'longrope'" in _error(d)


def test_no_safetensors_mentions_bin(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    assert "convert them to safetensors" in _error(d)
    (d / "pytorch_model.bin").unlink()
    assert ".bin is unsupported" in _error(d)


def test_missing_shard(make_hf_checkpoint, tmp_path):
    native = from_pretrained(make_hf_checkpoint("llama3"))
    d = save_pretrained(native, tmp_path / "sharded", max_shard_size=100_000)
    (d / "model-00002-of-{:05d}.safetensors".format(len(list(d.glob("model-*"))))).unlink()
    msg = _error(d)
    assert "model-00002" in msg and "missing" in msg


def test_shape_mismatch(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    _edit_config(d, intermediate_size=128)
    msg = _error(d)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "[128, 64]" in msg and "[160, 64]" in msg


def test_missing_and_unexpected_tensors(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert "missing tensors model.norm.weight" in _error(d)
    sd["model.norm.weight"] = torch.ones(64)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert "unexpected tensors model.layers.0.self_attn.q_proj.bias;" in _error(d)


def test_corrupt_safetensors_header(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage not json" * 10)
    msg = _error(d)
    assert "model.safetensors" in msg and "not a valid safetensors file" in msg


def test_reads_transformers_sharded_layout(make_hf_checkpoint, load_hf_model, tmp_path):
    src = make_hf_checkpoint("llama3_2")
    load_hf_model(src).save_pretrained(tmp_path / "hf_sharded", max_shard_size="100KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    _same_tensors(from_pretrained(tmp_path / "hf_sharded").state_dict(), from_pretrained(src).state_dict())


def test_truncated_safetensors(make_hf_checkpoint, tmp_path):
    d = _copy(make_hf_checkpoint, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a valid safetensors file" in _error(d)
