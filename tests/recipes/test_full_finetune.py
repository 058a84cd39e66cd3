"""full_finetune_single_device end to end on a transformers-written checkpoint (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import ConfigError
from tunelab.training.metrics import read_metrics


def _argv(rt, ckpt, out, data, *extra):
    return ["--config", "tiny/full", f"checkpoint_dir={ckpt}", f"tokenizer={rt.TINY_TOKENIZER}", f"output_dir={out}",
            f"dataset.source={data}", "validation=null", "max_seq_len=64", "batch_size=4", "log_every_n_steps=1",
            "eval_every_n_steps=null", "lr_scheduler.warmup_steps=1", "heldout_accuracy=null", *extra]


def _run(argv):
    from tunelab.recipes import full_finetune_single_device as recipe

    recipe.main(argv)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir="))
    return [r for r in read_metrics(f"{out}/metrics.jsonl") if "loss" in r]


def test_trains_every_weight_and_the_folder_loads_in_transformers(tmp_path, make_hf_checkpoint, load_hf_model, rt):
    """The loss falls; step_N/merged holds every weight, changed from the base, and transformers
    gives the logits tunelab gives for them (fp32, 1e-4)."""
    from tunelab.models import from_pretrained

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    rows = _run(_argv(rt, ckpt, out, data, "epochs=4", "max_steps=16", "optimizer.lr=3.0e-3"))
    assert [r["step"] for r in rows] == list(range(1, 17)) and rows[0]["grad_norm"] > 0
    assert sum(r["loss"] for r in rows[-4:]) / 4 < rows[0]["loss"] - 0.5
    merged = out / "step_16" / "merged"
    trained = load_hf_model(merged)
    base = load_hf_model(ckpt)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.named_parameters()))  # every weight trained (embeddings, norms, head)
    tokens = torch.randint(0, 700, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trained(tokens).logits, from_pretrained(merged).eval()(tokens), rtol=1e-4, atol=1e-4)
    assert not (out / "step_16" / "adapter").exists()


def test_optimizer_in_backward_equals_the_ordinary_step(tmp_path, make_hf_checkpoint, rt):
    """The same AdamWBF16 stepped inside backward or after it (no accumulation, no clipping):
    the same losses, gradient norms (1e-6: one norm sums per-parameter pieces, the other is
    torch's) and weights (bit for bit: the same updates on the same gradients)."""
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        runs[flag] = (_run(_argv(rt, ckpt, out, data, "max_steps=3", f"optimizer_in_backward={flag}")),
                      load_file(out / "step_3" / "merged" / "model.safetensors"))
    for a, b in zip(runs["true"][0], runs["false"][0]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for name, tensor in runs["false"][1].items():
        assert torch.equal(runs["true"][1][name], tensor), name


def test_resume_is_bit_identical(tmp_path, make_hf_checkpoint, rt):
    """4 steps straight, or 2 + resume: the same losses and final weights, bit for bit (the
    whole model and the optimizer's moments are in step_2/state)."""
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    common = ("max_steps=4", "save_every_n_steps=2", "keep_last_n_checkpoints=3")
    straight = _run(_argv(rt, ckpt, tmp_path / "a", data, *common))
    _run(_argv(rt, ckpt, tmp_path / "b", data, *common, "max_steps=2"))
    resumed = _run(_argv(rt, ckpt, tmp_path / "b", data, *common, "resume=true"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = load_file(tmp_path / "a" / "step_4" / "merged" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step_4" / "merged" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ordinary_optimizer_with_accumulation_and_clipping(tmp_path, make_hf_checkpoint, rt):
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    rows = _run(_argv(rt, ckpt, tmp_path / "out", data, "max_steps=2", "optimizer_in_backward=false",
                      "optimizer._component_=torch.optim.AdamW", "gradient_accumulation_steps=2",
                      "max_grad_norm=1.0"))
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("override,match", [
    (("gradient_accumulation_steps=2",), "gradients cannot accumulate"),
    (("max_grad_norm=1.0",), "cannot clip"),
    (("quantize=nf4",), "full fine-tuning trains"),
    (("optimizer._component_=torch.optim.AdamW",), "one parameter at a time"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, make_hf_checkpoint, rt, override, match):
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(8))
    with pytest.raises(ConfigError, match=match):
        _run(_argv(rt, ckpt, tmp_path / "out", data, *override))
