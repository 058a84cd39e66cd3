"""The shipped tiny/lora config (builtin:tiny checkpoint + packaged data), packing and
activation checkpointing."""

import pytest

from tunelab.training.checkpointing import COMPLETE
from tunelab.training.metrics import read_metrics


def test_tiny_lora_as_shipped(tmp_path, capsys):
    from tunelab.recipes import lora_finetune_single_device as recipe

    out = tmp_path / "out"
    recipe.main(["--config", "tiny/lora", f"output_dir={out}", "max_steps=3", "eval_every_n_steps=2"])
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 3]  # log_every_n_steps=25: first and last
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    assert (out / "step_3" / COMPLETE).is_file() and (out / "step_3" / "merged" / "tokenizer.model").is_file()
    text = (out / "config.yaml").read_text()
    assert "builtin:tiny" in text  # the config as given, not the resolved cache path
    assert "sample completion" in capsys.readouterr().out


def test_packing(tmp_path, make_hf_checkpoint, rt):
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(40))
    rows = rt.run_lora(rt.lora_argv(make_hf_checkpoint("llama3_1"), tmp_path / "out", data, "packing=true",
                                    "batch_size=2", "max_steps=2", "save_merged=never"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)


def test_activation_checkpointing_same_losses(tmp_path, make_hf_checkpoint, rt):
    """Recomputing layers in backward changes nothing but memory (dropout masks are replayed):
    same losses to fp32 rounding."""
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    common = ("max_steps=3", "lora.dropout=0.1", "save_merged=never", "optimizer.lr=1.0e-2")
    a = rt.run_lora(rt.lora_argv(ckpt, tmp_path / "a", data, *common, "activation_checkpointing=false"))
    b = rt.run_lora(rt.lora_argv(ckpt, tmp_path / "b", data, *common, "activation_checkpointing=true"))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
