"""config.json <-> ModelArgs: hub/transformers-5 layouts, builders, refusals."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab.models as M
from tunelab.errors import CheckpointError
from tunelab.models import ModelArgs, args_from_hf_config, build_model, hf_config_from_args
from tunelab.modules.rope import rope_inv_freq

# Verbatim from the hub (meta-llama/Llama-3.1-8B-Instruct and meta-llama/Llama-2-7b-hf).
HUB_LLAMA3_1_8B = json.loads("""{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
 "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
 "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
 "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
 "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
 "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
 "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
 "use_cache": true, "vocab_size": 128256}""")
HUB_LLAMA2_7B = json.loads("""{"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
 "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
 "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
 "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
 "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
 "use_cache": true, "vocab_size": 32000}""")

# Published parameter counts (HF model cards / safetensors metadata).
PARAMS = {
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_builder_parameter_counts(name):
    model = build_model(getattr(M, name)(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_hub_configs_give_builder_args():
    assert args_from_hf_config(HUB_LLAMA3_1_8B) == M.llama3_1_8b(eos_token_id=[128001, 128008, 128009])
    assert args_from_hf_config(HUB_LLAMA2_7B) == M.llama2_7b()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_config_round_trip_and_transformers_frequencies(name):
    """args -> config.json -> args is the identity, and transformers reads the same RoPE."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    args = getattr(M, name)()
    cfg = hf_config_from_args(args)
    assert args_from_hf_config(json.loads(json.dumps(cfg))) == args
    hf_cfg = LlamaConfig(**cfg)
    assert hf_cfg.head_dim == args.head_dim and hf_cfg.num_key_value_heads == args.n_kv_heads
    ref = LlamaRotaryEmbedding(hf_cfg).inv_freq
    ours = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0), name  # same fp32 formula


def test_source_config_extras_and_layout_kept():
    args = args_from_hf_config(HUB_LLAMA3_1_8B)
    cfg = hf_config_from_args(args, source_config=HUB_LLAMA3_1_8B)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["eos_token_id"] == [128001, 128008, 128009]
    assert cfg["rope_scaling"]["factor"] == 8.0 and "rope_parameters" not in cfg
    t5 = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "foo": 1}
    cfg = hf_config_from_args(M.llama2_7b(), source_config=t5)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["foo"] == 1 and "rope_scaling" not in cfg and "rope_theta" not in cfg


def test_rope_parameters_layout():
    cfg = dict(HUB_LLAMA3_1_8B)
    scaling = cfg.pop("rope_scaling")
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = dict(scaling, rope_theta=500000.0)
    assert args_from_hf_config(cfg) == args_from_hf_config(HUB_LLAMA3_1_8B)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    args = args_from_hf_config(cfg)
    assert args.rope_scaling is None and args.rope_theta == 1234.0


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "gpt_neox"}, "model_type='gpt_neox'"),
        ({"model_type": "mistral"}, "architectures=['LlamaForCausalLM'] is not supported for model_type 'mistral'"),
        ({"architectures": ["MistralForCausalLM"]}, "architectures=['MistralForCausalLM']"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type='longrope'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"num_key_value_heads": 5}, "n_kv_heads"),
    ],
)
def test_refusals(change, needle):
    cfg = dict(HUB_LLAMA3_1_8B, **change)
    with pytest.raises(CheckpointError) as e:
        args_from_hf_config(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_model_args_defaults():
    args = ModelArgs(vocab_size=10, dim=64, n_layers=1, n_heads=4, hidden_dim=128)
    assert args.n_kv_heads == 4 and args.head_dim == 16
    with pytest.raises(ValueError):
        ModelArgs(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=128)


@pytest.mark.parametrize("change, needle", [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be >= 1"),
    ({"num_attention_heads": "four"}, "num_attention_heads='four' is not an integer"),
    ({"hidden_size": 4096.5}, "hidden_size=4096.5 is not an integer"),
    ({"hidden_size": True}, "hidden_size=True is not an integer"),
    ({"num_hidden_layers": {"a": [1]}}, "num_hidden_layers={'a': [1]} is not an integer"),
    ({"vocab_size": -5}, "vocab_size=-5 must be >= 1"),
    ({"intermediate_size": [14336]}, "intermediate_size=[14336] is not an integer"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' must be a positive number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps=0 must be a positive number"),
    ({"rope_theta": "big"}, "rope_theta='big' must be a positive number"),
    ({"rope_scaling": dict(HUB_LLAMA3_1_8B["rope_scaling"], factor="x")}, "rope_scaling.factor='x'"),
    ({"max_position_embeddings": 0}, "max_position_embeddings=0 must be >= 1"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "must be a list"),
])
def test_every_field_the_model_uses_is_type_and_range_checked(change, needle):
    """config.json values of the wrong type or out of range: one line naming the key (they were
    tracebacks, or silently truncated like a fractional hidden_size)."""
    with pytest.raises(CheckpointError) as e:
        args_from_hf_config(dict(HUB_LLAMA3_1_8B, **change))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_shard_index_cannot_point_outside_the_folder(tmp_path):
    from tunelab.models.checkpoint import safetensors_files

    (tmp_path / "outside.safetensors").write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file inside") as e:
        safetensors_files(ckpt)
    assert "\n" not in str(e.value)
