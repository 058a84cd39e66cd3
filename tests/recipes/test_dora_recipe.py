"""DoRA through the LoRA recipe (``lora.use_dora: true``), over a dense and an NF4 base."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.models.adapters import load_adapter
from tunelab.models.checkpoint import from_pretrained


def _tokens(seed):
    return torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(seed))

@pytest.mark.parametrize("quantize", ["null", "nf4"])
def test_recipe_trains_dora_and_exports_it(tmp_path, make_hf_checkpoint, load_hf_model, rt, quantize):
    """``lora.use_dora: true`` in the LoRA recipe (and QLoRA): the loss falls, the magnitudes
    train, the adapter folder says use_dora and loads in PEFT with the merged folder's logits
    (1e-4, fp32; QLoRA's merged weights are over the dequantized base, so there the adapter is
    applied to the NF4 base), and resume keeps the setting fixed."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tunelab.errors import ConfigError

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    argv = rt.lora_argv(ckpt, out, data, "epochs=4", "optimizer.lr=1.0e-2", "lora.use_dora=true",
                        f"quantize={quantize}", "lora.targets=[q_proj,v_proj,down_proj]")
    rows = [r for r in rt.run_lora(argv) if "loss" in r]
    assert sum(r["loss"] for r in rows[-4:]) / 4 < rows[0]["loss"] - 0.1
    step = max(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    cfg = json.loads((step / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(step / "adapter" / "adapter_model.safetensors")
    magnitudes = [v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")]
    assert cfg["use_dora"] is True and len(magnitudes) == 6
    base = from_pretrained(ckpt, dtype=torch.float32)
    norms = torch.linalg.vector_norm(base.layers[0].attn.q_proj.weight, dim=1)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert not torch.allclose(tensors[key], norms, atol=1e-4)  # trained away from the init
    tokens = _tokens(4)
    with torch.no_grad():
        merged = load_hf_model(step / "merged").eval()(tokens).logits
        if quantize == "null":
            adapted = PeftModel.from_pretrained(load_hf_model(ckpt), step / "adapter").eval()(tokens).logits
        else:  # QLoRA merges into the dequantized NF4 base: compare with the adapter over that base
            adapted = load_adapter(from_pretrained(ckpt, dtype=torch.float32, quantize="nf4"), step / "adapter")
            adapted = adapted.eval()(tokens)
        torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="lora.use_dora"):
        rt.run_lora([*argv[:-3], "lora.use_dora=false", f"quantize={quantize}", "lora.targets=[q_proj,v_proj,down_proj]",
                     "resume=true", "epochs=5"])


def test_dpo_runs_with_dora(tmp_path, make_hf_checkpoint, rt):
    """The DPO recipe with DoRA adapters (the reference is the adapters switched off)."""
    from tunelab.recipes import lora_dpo_single_device as dpo
    from tunelab.training.metrics import read_metrics

    pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1]} for w in ("apple", "river", "stone", "cloud")]
    data = rt.write_jsonl(tmp_path / "pairs.jsonl", pairs * 2)
    out = tmp_path / "dpo"
    dpo.main(["--config", "tiny/dpo", f"checkpoint_dir={make_hf_checkpoint('llama3')}",
              f"tokenizer={rt.TINY_TOKENIZER}", f"output_dir={out}", f"dataset.source={data}", "validation=null",
              "max_steps=2", "batch_size=2", "lora.use_dora=true", "save_merged=never", "heldout_accuracy=null"])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
