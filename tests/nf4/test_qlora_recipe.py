"""``tiny/qlora`` end to end through lora_finetune_single_device (CPU, fp32): the loss falls, the
adapter is PEFT's format and loads in PEFT on the dequantized base, and the merged export is a
plain dense checkpoint (dequantized base + adapter, no quantization_config)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import tunelab

REPO = Path(tunelab.__file__).resolve().parent
TINY_TOKENIZER = REPO / "data" / "tiny" / "tokenizer.model"
WORDS = "apple river stone window garden planet tiger castle forest candle summer rocket".split()


def _rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(1, 5))
        rows.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
    return rows


def test_tiny_qlora_end_to_end(tmp_path, make_hf_checkpoint, load_hf_model, capsys):
    from peft import PeftModel

    from tunelab.models import from_pretrained, save_pretrained
    from tunelab.recipes import lora_finetune_single_device as recipe
    from tunelab.training.metrics import read_metrics

    ckpt = make_hf_checkpoint("llama3")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(16)))
    out = tmp_path / "out"
    recipe.main([
        "--config", "tiny/qlora", f"checkpoint_dir={ckpt}", f"tokenizer={TINY_TOKENIZER}", f"output_dir={out}",
        f"dataset.source={data}", "validation=null", "max_seq_len=64", "batch_size=4", "log_every_n_steps=1",
        "eval_every_n_steps=null", "lr_scheduler.warmup_steps=1", "max_steps=8", "optimizer.lr=1.0e-2",
    ])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert sum(r["loss"] for r in rows[-3:]) / 3 < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]

    step_dir = out / "step_8"
    adapter_cfg = json.loads((step_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and "q_proj" in adapter_cfg["target_modules"]
    merged_cfg = json.loads((step_dir / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg

    # the dequantized base as an HF folder: what the adapter was trained against
    base_dir = save_pretrained(from_pretrained(ckpt, quantize="nf4"), tmp_path / "dequantized", source_dir=ckpt)
    tokens = torch.randint(0, 700, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_hf_model(base_dir), step_dir / "adapter").eval()(tokens).logits
        merged_logits = load_hf_model(step_dir / "merged")(tokens).logits
        base_logits = load_hf_model(base_dir)(tokens).logits
    # fp32 on both sides, same weights up to the order of the merge: 1e-4
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter learned something

