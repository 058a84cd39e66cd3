"""lora_dpo_distributed on CPU with gloo: 2 ranks vs one device (lora_dpo_single_device), resume
on 1 rank, the precomputed reference gathered over ranks, and QLoRA.

Tolerances: fp32 throughout. Each rank pads its own pairs (one device pads all of them
together), and the per-pair losses, rewards and gradients are summed per rank and then across
ranks, so the same numbers are added in another order. Losses and grad norms agree to ~1e-6
relative and the adapters, after a few AdamW steps, to ~5e-6 absolute: we allow 1e-5 (AdamW
divides each gradient element by its own RMS, so the rounding of near-zero elements becomes an
update difference proportional to the lr: at lr 1e-2 it reaches 4e-5, hence lr 3e-3). A reward
is beta x (policy - reference) summed log-probs, a small difference of two sums of tens of
nats, so its rounding is ~1e-6 absolute (measured up to 2.5e-6 after 4 steps), not relative to
the reward itself: rewards get rel 1e-5 plus abs 1e-5. Where precomputed reference log-probs
are used, step-1 rewards are rounding-level numbers (policy == reference up to padding), so
the step-1 accuracy (strict chosen > rejected) is not compared.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tunelab.training.checkpointing import COMPLETE
from tunelab.training.dpo import REWARD_KEYS
from tunelab.training.metrics import read_metrics

ALL_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,output]"  # a LoRA'd (sharded) head too


def common(ckpt, out, data, tokenizer, *extra: str) -> list[str]:
    return [
        f"checkpoint_dir={ckpt}", f"tokenizer={tokenizer}", f"output_dir={out}", f"dataset.source={data}",
        "validation=null", "eval_every_n_steps=null", "max_seq_len=64", "log_every_n_steps=1",
        "lr_scheduler.warmup_steps=1", "max_steps=4", "epochs=2", "gradient_accumulation_steps=2",
        "optimizer.lr=3.0e-3", "loss.beta=0.5", "save_merged=never", *extra,
    ]


def train_rows(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def assert_same_rows(rows_a: dict[int, dict], rows_b: dict[int, dict], prefix: str = "", skip_step1=()):
    """Loss (and grad norm on training rows): rel 1e-5; rewards: rel 1e-5 + abs 1e-5 (see top)."""
    assert list(rows_a) == list(rows_b)
    for step in rows_a:
        for key in (f"{prefix}loss", *(f"{prefix}{k}" for k in REWARD_KEYS), *(["grad_norm"] if not prefix else [])):
            if step == 1 and key in skip_step1:
                continue
            abs_tol = 1e-5 if "rewards/" in key else 0.0
            assert rows_a[step][key] == pytest.approx(rows_b[step][key], rel=1e-5, abs=abs_tol), (step, key)


def assert_same_adapter(dir_a, dir_b):
    a = load_file(str(dir_a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(dir_b / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_without_torchrun_the_error_says_how_to_launch(tmp_path, monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.recipes import lora_dpo_distributed as recipe

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="lora_dpo_distributed must be launched by torchrun.*--nproc_per_node"):
        recipe.main(["--config", "tiny/dpo_distributed", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no reference"):  # DPO settings are checked before any launch
        recipe.main(["--config", "tiny/dpo_distributed", f"output_dir={tmp_path}", "loss.type=simpo",
                     "precompute_ref_log_probs=true"])


def test_two_ranks_match_one_device_and_resume_on_one_rank(tmp_path, make_hf_checkpoint, dt):
    """2 ranks x 2 pairs (gradient accumulation 2, activation checkpointing, LoRA on every
    projection and the head) == one device x 4 pairs: same losses, rewards, accuracy, margins,
    grad norms and evaluation rows, same adapter. Then the 2-rank step-2 checkpoint resumes on
    1 rank (4 pairs) and continues with the 2-rank numbers."""
    from tunelab.recipes import lora_dpo_single_device as single_recipe

    ckpt = make_hf_checkpoint("llama3")
    data = dt.pairs_jsonl(tmp_path / "train.jsonl", 24)  # 3 steps per epoch: step 4 is in epoch 2
    val = dt.pairs_jsonl(tmp_path / "val.jsonl", 6, start=500)  # even: both ranks score 3 pairs
    extra = (f"lora.targets={ALL_TARGETS}", f"validation={{_component_: tunelab.data.preference_dataset, source: {val}}}",
             "eval_every_n_steps=2")
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    run = dt.torchrun(2, dt.DPO_RECIPE, "--config", "tiny/dpo_distributed",
                      *common(ckpt, dist_out, data, dt.TINY_TOKENIZER, *extra), "batch_size=2",
                      "save_every_n_steps=2", "activation_checkpointing=true")
    assert run.returncode == 0, run.stderr[-3000:]
    single_recipe.main(["--config", "tiny/dpo", *common(ckpt, single_out, data, dt.TINY_TOKENIZER, *extra),
                        "batch_size=4"])

    dist_rows, single_rows = train_rows(dist_out), train_rows(single_out)
    assert list(dist_rows) == [1, 2, 3, 4] and dist_rows[4]["epoch"] == 1
    assert dist_rows[4]["rewards/margins"] > 0.01  # it learned something, so the comparison means something
    assert_same_rows(dist_rows, single_rows)
    evals = {r["step"]: r for r in read_metrics(dist_out / "metrics.jsonl") if "eval_loss" in r}
    single_evals = {r["step"]: r for r in read_metrics(single_out / "metrics.jsonl") if "eval_loss" in r}
    assert list(evals) == [2, 4]
    assert_same_rows(evals, single_evals, prefix="eval_")
    assert sorted(p.name for p in (dist_out / "step_4").iterdir()) == ["COMPLETE", "adapter", "state"]
    assert_same_adapter(dist_out / "step_4", single_out / "step_4")

    # resume the 2-rank step-2 checkpoint on 1 rank with the same global batch (1 x 4)
    resumed_out = dt.resume_on_one_rank(dist_out, tmp_path / "resumed", dt.DPO_RECIPE, "--config",
                                        "tiny/dpo_distributed",
                                        *common(ckpt, tmp_path / "resumed", data, dt.TINY_TOKENIZER, *extra),
                                        "batch_size=4")
    assert_same_rows(train_rows(resumed_out), dist_rows)
    assert (resumed_out / "step_4" / COMPLETE).is_file()
    assert_same_adapter(resumed_out / "step_4", dist_out / "step_4")


def test_qlora_with_precomputed_reference_two_ranks_match_one_device(tmp_path, make_hf_checkpoint, dt):
    """quantize=nf4 and precompute_ref_log_probs=true on 2 ranks: 13 pairs (odd, so one rank's
    last slot wraps around) are scored half per rank and all-gathered; the run equals one
    device's QLoRA DPO with the reference computed in each step (same losses, rewards, adapter)."""
    from tunelab.recipes import lora_dpo_single_device as single_recipe

    ckpt = make_hf_checkpoint("llama3_1")
    data = dt.pairs_jsonl(tmp_path / "train.jsonl", 13, start=100)
    extra = ("quantize=nf4", "max_steps=3", "gradient_accumulation_steps=1")
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    run = dt.torchrun(2, dt.DPO_RECIPE, "--config", "tiny/dpo_distributed",
                      *common(ckpt, dist_out, data, dt.TINY_TOKENIZER, *extra), "batch_size=2",
                      "precompute_ref_log_probs=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reference log-probs of 13 pairs precomputed" in run.stdout
    single_recipe.main(["--config", "tiny/dpo", *common(ckpt, single_out, data, dt.TINY_TOKENIZER, *extra),
                        "batch_size=4"])
    dist_rows = train_rows(dist_out)
    assert list(dist_rows) == [1, 2, 3] and dist_rows[3]["rewards/margins"] > 0.01
    assert_same_rows(dist_rows, train_rows(single_out), skip_step1=("rewards/accuracy",))
    assert_same_adapter(dist_out / "step_3", single_out / "step_3")


def test_kto_trains_on_two_ranks(tmp_path, make_hf_checkpoint, dt):
    """KTO (unpaired rows; the KL estimate averaged over the ranks, as TRL gathers it) in the
    FSDP recipe: it trains and logs its metrics. (It does not equal one device's numbers for the
    same global batch by design, as with TRL on several GPUs: each prompt is paired with a
    completion of its own rank's micro-batch. ORPO takes the pairs' path the DPO tests cover.)"""
    ckpt = make_hf_checkpoint("llama3")
    words = ["apple", "river", "stone", "cloud", "tiger", "candle", "garden", "window"]
    kto_rows = [{"prompt": f"Say {w}.", "completion": w if i % 2 == 0 else w[::-1], "label": i % 2 == 0}
                for i, w in enumerate(words)]
    kto_data = tmp_path / "kto.jsonl"
    kto_data.write_text("".join(json.dumps(r) + "\n" for r in kto_rows))
    out = tmp_path / "kto"
    run = dt.torchrun(2, dt.DPO_RECIPE, "--config", "tiny/dpo_distributed",
                      *common(ckpt, out, kto_data, dt.TINY_TOKENIZER, "batch_size=2", "max_steps=2", "loss.type=kto",
                              "dataset._component_=tunelab.data.kto_dataset"))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = train_rows(out)
    assert sorted(rows) == [1, 2] and all(math.isfinite(r["loss"]) for r in rows.values())
    assert "kl" in rows[1] and rows[2]["rewards/chosen"] != 0.0  # trained at step 2
