"""Native Llama vs transformers' LlamaForCausalLM on the same random checkpoints.

Tolerance 1e-4 absolute on fp32 logits: both run the same math in fp32, so any real mapping
error (a swapped projection, a wrong rope layout or frequency) shows up as O(1e-1) or more,
while kernel-order differences stay around 1e-6.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tunelab.models import from_pretrained

TOL = 1e-4


def _compare(native, hf, tokens, **kw):
    with torch.no_grad():
        ours = native(tokens, **kw)
        ref = hf(tokens, **kw).logits
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("kind", ["llama2", "llama3", "llama3_1", "llama3_2", "mistral", "mistral_nemo", "qwen2",
                                  "qwen3", "gemma3", "phi3", "phi3_longrope", "qwen3_moe", "gpt_oss"])
def test_logits_match_transformers(kind, make_hf_checkpoint, load_hf_model):
    path = make_hf_checkpoint(kind)
    native, hf = from_pretrained(path), load_hf_model(path)
    # seq 80 > original_max_position_embeddings (64) so llama3 scaled frequencies matter.
    seq = 80 if kind == "llama3_1" else 40
    tokens = torch.randint(0, 1024, (2, seq))
    _compare(native, hf, tokens)


def test_tied_model_has_no_output_layer(make_hf_checkpoint):
    native = from_pretrained(make_hf_checkpoint("llama3_2"))
    assert not hasattr(native, "output")
    assert "output.weight" not in native.state_dict()
    assert native.output_weight is native.tok_embeddings.weight


def test_position_ids_match_transformers(make_hf_checkpoint, load_hf_model):
    path = make_hf_checkpoint("llama3_1")
    native, hf = from_pretrained(path), load_hf_model(path)
    tokens = torch.randint(0, 1024, (2, 30))
    # Offset positions (as in a continued sequence) exercise the explicit position_ids path.
    position_ids = torch.arange(100, 130)[None].repeat(2, 1)
    _compare(native, hf, tokens, position_ids=position_ids)


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_hub_rope_layout_loads(type_key, make_hf_checkpoint, load_hf_model, tmp_path):
    """Hub config.json files carry top-level rope_theta + rope_scaling (no rope_parameters)."""
    src = make_hf_checkpoint("llama3_1")
    dst = tmp_path / "hub"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params.pop("rope_type")
    cfg["rope_scaling"] = {type_key: "llama3", **params}
    (dst / "config.json").write_text(json.dumps(cfg))

    native = from_pretrained(dst)
    assert native.args.rope_scaling["factor"] == 8.0
    assert native.args.rope_theta == 500000.0
    # The oracle reads the original (rope_parameters) folder: same weights, same model.
    _compare(native, load_hf_model(src), torch.randint(0, 1024, (2, 80)))


def test_bf16_load(make_hf_checkpoint):
    native = from_pretrained(make_hf_checkpoint("llama3"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in native.parameters())
    assert native.rope.inv_freq.dtype == torch.float32  # rope stays exact
    assert native(torch.randint(0, 1024, (1, 8))).dtype == torch.bfloat16


def test_mistral_saves_as_mistral_and_runs_its_window(make_hf_checkpoint, load_hf_model, tmp_path):
    """A Mistral checkpoint keeps its family through save_pretrained (transformers loads the
    folder as MistralForCausalLM with the same logits); a sliding_window (Mistral 7B v0.1's
    4096, here 8 on 24 tokens) applies to every layer, as in transformers."""
    from tunelab.models import save_pretrained

    src = make_hf_checkpoint("mistral_nemo")
    native = from_pretrained(src)
    out = save_pretrained(native, tmp_path / "out", source_dir=src)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    hf = load_hf_model(out)
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.head_dim == 24
    _compare(native, hf, torch.randint(0, 1024, (2, 24)))
    windowed = make_hf_checkpoint("mistral", sliding_window=8)
    native = from_pretrained(windowed)
    assert native.args.sliding_window == 8 and all(native.args.is_sliding(i) for i in range(2))
    _compare(native, load_hf_model(windowed), torch.randint(0, 1024, (2, 24)))


def test_qwen2_biases_round_trip_and_a_live_window_is_refused(make_hf_checkpoint, load_hf_model, tmp_path):
    """Qwen2's q/k/v biases load, save back under their HF names (transformers reads the folder
    as Qwen2ForCausalLM with the same logits); both config spellings load (hub: rope_theta and
    no layer_types; transformers 5: rope_parameters and layer_types); use_sliding_window=true,
    which tunelab does not implement, is one line naming the key."""
    from safetensors import safe_open

    from tunelab.errors import CheckpointError
    from tunelab.models import save_pretrained

    src = make_hf_checkpoint("qwen2")
    native = from_pretrained(src)
    assert native.layers[0].attn.q_proj.bias is not None and native.layers[0].attn.o_proj.bias is None
    out = save_pretrained(native, tmp_path / "out", source_dir=src)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.1.self_attn.v_proj.bias" in f.keys()
    hf = load_hf_model(out)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    _compare(native, hf, torch.randint(0, 1024, (2, 40)))

    config = json.loads((src / "config.json").read_text())
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    hub_config = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    (hub / "config.json").write_text(json.dumps(dict(hub_config, rope_theta=1000000.0, rope_scaling=None)))
    assert from_pretrained(hub).args.rope_theta == 1000000.0
    _compare(from_pretrained(hub), load_hf_model(src), torch.randint(0, 1024, (2, 40)))

    (hub / "config.json").write_text(json.dumps(dict(hub_config, use_sliding_window=True)))
    with pytest.raises(CheckpointError, match="use_sliding_window=True is not supported") as info:
        from_pretrained(hub)
    assert "\n" not in str(info.value)


def test_gemma3_round_trip_and_hub_config(make_hf_checkpoint, load_hf_model, tmp_path):
    """Gemma 3's four norms per layer save back under their HF names (transformers reads the
    folder as Gemma3ForCausalLM with the same logits); the hub spelling of its config (rope_theta
    + rope_scaling for the global layers, rope_local_base_freq, sliding_window_pattern) loads to
    the same model; softcapping, which tunelab does not implement, is one line naming the key."""
    from tunelab.errors import CheckpointError
    from tunelab.models import save_pretrained

    src = make_hf_checkpoint("gemma3")
    native = from_pretrained(src)
    a = native.args
    assert [a.is_sliding(i) for i in range(3)] == [True, True, False] and a.attn_scale == 24 ** -0.5
    out = save_pretrained(native, tmp_path / "out", source_dir=src)
    hf = load_hf_model(out)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    tokens = torch.randint(0, 1024, (2, 40))
    _compare(native, hf, tokens)

    config = json.loads((src / "config.json").read_text())
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    hub_config = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    hub_config.update(rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                      rope_local_base_freq=10000.0, sliding_window_pattern=3)  # layers 0, 1 slide; 2 is global
    (hub / "config.json").write_text(json.dumps(hub_config))
    assert from_pretrained(hub).args == a
    _compare(from_pretrained(hub), load_hf_model(src), tokens)

    (hub / "config.json").write_text(json.dumps(dict(hub_config, final_logit_softcapping=30.0)))
    with pytest.raises(CheckpointError, match="final_logit_softcapping=30.0 is not supported") as info:
        from_pretrained(hub)
    assert "\n" not in str(info.value)


def test_gemma3_image_text_checkpoint(make_hf_checkpoint, load_hf_model, tmp_path):
    """Gemma 3 4B+ checkpoints are Gemma3ForConditionalGeneration: tunelab loads the language
    model (text logits equal transformers' on text-only input) and saves it back into a folder
    that loads as the image-text model again, the vision tensors byte for byte the source's."""
    from safetensors.torch import load_file

    from tunelab.models import save_pretrained

    src = make_hf_checkpoint("gemma3_mm")
    native = from_pretrained(src)
    assert native.args.multimodal and native.args.model_type == "gemma3_text"
    tokens = torch.randint(0, 1000, (2, 40))
    hf = load_hf_model(src)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    _compare(native, hf, tokens)
    out = save_pretrained(native, tmp_path / "out", source_dir=src, dtype=torch.bfloat16)
    reloaded = load_hf_model(out)
    assert type(reloaded).__name__ == "Gemma3ForConditionalGeneration"
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in before if not k.startswith("language_model.")]
    assert vision and all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in vision)
    assert after["language_model.model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == "gemma3_text"


def test_phi3_longrope_both_sides_round_trip_and_hub_config(make_hf_checkpoint, load_hf_model, tmp_path):
    """Phi-3's longrope: a batch within original_max_position_embeddings (32) runs the short
    factors, one past it the long factors for every position (logits equal transformers' on both
    sides, and the two sides really differ); the fused projections and partial rotary save back
    as Phi3ForCausalLM; the hub spelling (rope_scaling of type su, top-level
    original_max_position_embeddings and partial_rotary_factor) loads to the same model."""
    from tunelab.models import save_pretrained

    src = make_hf_checkpoint("phi3_longrope")
    native, hf = from_pretrained(src), load_hf_model(src)
    assert native.args.rotary_dim == 12 and native.args.fused_projections
    short, long = torch.randint(0, 1024, (2, 20)), torch.randint(0, 1024, (2, 40))
    _compare(native, hf, short)
    _compare(native, hf, long)
    with torch.no_grad():  # the first 20 positions of the long batch see other frequencies
        assert (native(long[:, :20]) - native(long)[:, :20]).abs().max() > 1e-3

    out = save_pretrained(native, tmp_path / "out", source_dir=src)
    reloaded = load_hf_model(out)
    assert type(reloaded).__name__ == "Phi3ForCausalLM"
    _compare(native, reloaded, long)

    config = json.loads((src / "config.json").read_text())
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    params = config.pop("rope_parameters")
    config.update(rope_theta=params["rope_theta"], partial_rotary_factor=params["partial_rotary_factor"],
                  original_max_position_embeddings=params["original_max_position_embeddings"],
                  rope_scaling={"type": "su", "short_factor": params["short_factor"],
                                "long_factor": params["long_factor"]})
    (hub / "config.json").write_text(json.dumps(config))
    assert from_pretrained(hub).args == native.args
