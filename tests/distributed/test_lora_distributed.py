"""lora_finetune_distributed on CPU with gloo: 2 ranks vs one device, resume on 1 rank,
a failing rank, and the FSDP benchmark's smoke run.

Tolerances: fp32 throughout; the 2-rank run sums the same per-token losses and gradients in a
different order (per rank, then across ranks), so losses agree to ~1e-6 relative and the
adapters, after 4 AdamW steps, to ~1e-6 absolute: we allow 1e-5 for both.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from tunelab.training.checkpointing import COMPLETE
from tunelab.training.checkpointing import RankSampler
from tunelab.training.metrics import read_metrics

TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"  # plain head: the fused-loss path


def common(ckpt, out, data, tokenizer) -> list[str]:
    return [
        f"checkpoint_dir={ckpt}", f"tokenizer={tokenizer}", f"output_dir={out}", f"dataset.source={data}",
        "validation=null", "eval_every_n_steps=null", "max_seq_len=64", "log_every_n_steps=1",
        "lr_scheduler.warmup_steps=1", "max_steps=4", "epochs=2", "gradient_accumulation_steps=2",
        f"lora.targets={TARGETS}", "optimizer.lr=3.0e-3",
    ]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def assert_same_tensors(dir_a, dir_b, name, atol):
    a, b = load_file(str(dir_a / name)), load_file(str(dir_b / name))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=atol, msg=k)


def test_rank_sampler_micro_batches_equal_one_device():
    """Rank r takes every world-th sample: micro-batch k of all ranks = micro-batch k of one
    device with batch_size x world, also from a mid-epoch start."""
    n, b, world = 23, 2, 3
    one = RankSampler(n, seed=5, rank=0, world_size=1)
    ranks = [RankSampler(n, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(1, start_sample=6)
    single = list(one)
    streams = [list(s) for s in ranks]
    for k in range(len(single) // (b * world)):
        together = sorted(i for stream in streams for i in stream[k * b:(k + 1) * b])
        assert together == sorted(single[k * b * world:(k + 1) * b * world])
    assert sum(len(s) for s in ranks) == len(one) == n - 6


def test_without_torchrun_the_error_says_how_to_launch(tmp_path, monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.recipes import lora_finetune_distributed as recipe

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="launched by torchrun.*--nproc_per_node"):
        recipe.main(["--config", "tiny/lora_distributed", f"output_dir={tmp_path}"])


def test_two_ranks_match_one_device_and_resume_on_one_rank(tmp_path, make_hf_checkpoint, dt):
    """2 ranks x batch 2 (gradient accumulation 2, activation checkpointing) == one device x
    batch 4: same losses, same adapter, same merged model. Then the 2-rank step-2 checkpoint
    resumes on 1 rank (batch 4) and continues with the 2-rank losses."""
    from tunelab.recipes import lora_finetune_single_device as single_recipe

    ckpt = make_hf_checkpoint("llama3")
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 24)
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    base = common(ckpt, dist_out, data, dt.TINY_TOKENIZER)
    run = dt.torchrun(2, dt.DIST_RECIPE, "--config", "tiny/lora_distributed", *base, "batch_size=2",
                      "save_every_n_steps=2", "activation_checkpointing=true")
    assert run.returncode == 0, run.stderr[-3000:]
    single_recipe.main(["--config", "tiny/lora", *common(ckpt, single_out, data, dt.TINY_TOKENIZER), "batch_size=4"])

    dist_losses, single_losses = losses(dist_out), losses(single_out)
    assert list(dist_losses) == [1, 2, 3, 4]
    assert dist_losses == pytest.approx(single_losses, rel=1e-5)
    final = dist_out / "step_4"
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "adapter", "merged", "state"]
    assert sorted(p.name for p in (dist_out / "step_2").iterdir()) == ["COMPLETE", "adapter", "state"]
    assert_same_tensors(final / "adapter", single_out / "step_4" / "adapter", "adapter_model.safetensors", 1e-5)
    assert_same_tensors(final / "merged", single_out / "step_4" / "merged", "model.safetensors", 1e-5)
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 16

    # resume the 2-rank step-2 checkpoint on 1 rank with the same global batch (1 x 4)
    resumed_out = dt.resume_on_one_rank(dist_out, tmp_path / "resumed", dt.DIST_RECIPE, "--config",
                                        "tiny/lora_distributed",
                                        *common(ckpt, tmp_path / "resumed", data, dt.TINY_TOKENIZER), "batch_size=4")
    assert losses(resumed_out) == pytest.approx(dist_losses, rel=1e-5)
    assert (resumed_out / "step_4" / COMPLETE).is_file()
    assert_same_tensors(resumed_out / "step_4" / "adapter", final / "adapter", "adapter_model.safetensors", 1e-5)


@pytest.mark.parametrize("shard_frozen", [True, False])
def test_qlora_two_ranks_match_one_device(tmp_path, make_hf_checkpoint, dt, shard_frozen):
    """quantize=nf4: the packed 4-bit storage is sharded (rank 0 holds about half of all
    parameter bytes) or, with fsdp.shard_frozen=false, held whole by every rank (only the
    adapters sharded: what runs on torch < 2.13); either way 2 ranks x batch 2 give one
    device's QLoRA losses and adapter; the export_gguf step runs on rank 0."""
    import re

    from tunelab.recipes import lora_finetune_single_device as single_recipe

    ckpt = make_hf_checkpoint("llama3_1")
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 16)
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    extra = ("quantize=nf4", "max_steps=2", "gradient_accumulation_steps=1", "save_merged=never")
    run = dt.torchrun(2, dt.DIST_RECIPE, "--config", "tiny/lora_distributed",
                      *common(ckpt, dist_out, data, dt.TINY_TOKENIZER), *extra, "batch_size=2",
                      "export_gguf.dtype=f16", f"fsdp.shard_frozen={str(shard_frozen).lower()}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (dist_out / "step_2" / "model-f16.gguf").is_file()  # rank 0 exported base + adapter
    held, total = map(float, re.search(r"held by rank 0: ([\d.]+) MiB of ([\d.]+) MiB", run.stdout).groups())
    # replicated: all but half of the (fp32, on a tiny model sizeable) adapters
    assert held < 0.55 * total if shard_frozen else held > 0.85 * total
    single_recipe.main(["--config", "tiny/qlora", *common(ckpt, single_out, data, dt.TINY_TOKENIZER), *extra,
                        "batch_size=4"])
    assert losses(dist_out) == pytest.approx(losses(single_out), rel=1e-5)
    assert_same_tensors(dist_out / "step_2" / "adapter", single_out / "step_2" / "adapter",
                        "adapter_model.safetensors", 1e-5)


FAILING_DATA = '''
import os
from tunelab.data import instruct_dataset

def rank1_fails(tokenizer, *, source, max_seq_len):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 cannot read its data (injected failure)")
    return instruct_dataset(tokenizer, source=source, max_seq_len=max_seq_len)
'''


def test_failing_rank_ends_the_job_with_its_error(tmp_path, make_hf_checkpoint, dt):
    """Launched like a user does (`tune run --nproc_per_node 2 ...`, which execs torchrun). Rank 1
    raises while rank 0 waits in the first collective: torchrun stops the job, the output names
    rank 1 and its error, nothing hangs (bounded by the subprocess timeout)."""
    (tmp_path / "failing_data.py").write_text(FAILING_DATA)
    ckpt = make_hf_checkpoint("llama2")
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 8)
    start = time.monotonic()
    run = dt.torchrun(2, "lora_finetune_distributed", "--config", "tiny/lora_distributed",
                      *common(ckpt, tmp_path / "out", data, dt.TINY_TOKENIZER), "batch_size=2",
                      "dataset._component_=failing_data.rank1_fails", "allowed_components=[failing_data.*]",
                      "dist_timeout_s=30",
                      timeout=80, extra_env={"PYTHONPATH": str(tmp_path)}, via_tune=True)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "error: rank 1 failed: RuntimeError: rank 1 cannot read its data (injected failure)" in output
    root_cause = output.split("Root Cause")[-1]  # torchrun's summary: the failing rank and its exception
    assert "rank      : 1" in root_cause and "RuntimeError: rank 1 cannot read its data" in root_cause
    assert time.monotonic() - start < 75
    assert not (tmp_path / "out" / "step_4").exists()


def test_fsdp_bench_tiny_smoke(dt):
    """bench/fsdp_step.py on 2 CPU ranks prints one JSON line with the recorded fields."""
    run = dt.torchrun(2, dt.REPO / "bench" / "fsdp_step.py", extra_env={"SHAPE": "tiny", "STEPS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert {"commit", "device", "world_size", "profile", "tokens_per_s", "peak_gib"} <= set(row)
    assert row["world_size"] == 2 and row["device"] == "cpu" and row["tokens_per_s"] > 0


def test_nf4_sharding_on_old_torch_fails_with_the_fix(monkeypatch):
    """torch 2.11's FSDP2 cannot shard integer parameters (NF4 storage): a one-line error naming
    the fixes, before anything is sharded (the 2-rank QLoRA tests above run torch >= 2.13)."""
    from types import SimpleNamespace

    from tunelab.errors import ConfigError
    from tunelab.models import tiny
    from tunelab.training import sharding

    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    lora = SimpleNamespace(targets=["q_proj"], rank=2, alpha=4, dropout=0.0, use_dora=False)
    model = sharding.build_meta_model(tiny(vocab_size=64), torch.float32, lora, "nf4")
    assert any(p.dtype == torch.uint8 for p in model.parameters())
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.13.*fsdp\.shard_frozen: false") as err:
        sharding.shard_model(model, param_dtype=None, reshard_after_forward=True, cpu_offload=False)
    assert "\n" not in str(err.value)


def test_replicated_frozen_base_needs_no_cpu_offload_and_torch_2_7(monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.models import build_model, tiny
    from tunelab.training import sharding

    model = build_model(tiny(vocab_size=64), device="meta", dtype=torch.float32)
    with pytest.raises(ConfigError, match="fsdp.shard_frozen: false .* fsdp.cpu_offload: true"):
        sharding.shard_model(model, param_dtype=None, reshard_after_forward=True, cpu_offload=True,
                               shard_frozen=False)
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(ConfigError, match=r"fsdp.shard_frozen: false needs torch >= 2\.7"):
        sharding.shard_model(model, param_dtype=None, reshard_after_forward=True, cpu_offload=False,
                               shard_frozen=False)


RANK1_POISON = '''
import os

import torch


class Rank1PoisonAdamW(torch.optim.AdamW):
    """AdamW whose 2nd step leaves nan in rank 1's shard of a LoRA weight only."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        out = super().step(closure)
        self.steps += 1
        if self.steps == 2 and os.environ.get("RANK") == "1":
            with torch.no_grad():
                p = self.param_groups[0]["params"][0]
                (p.to_local() if hasattr(p, "to_local") else p).fill_(float("nan"))
        return out
'''


def test_non_finite_weights_on_one_rank_stop_every_rank_before_the_save(tmp_path, make_hf_checkpoint, dt):
    """Only rank 1's shard turns nan after step 2: the all-reduced check stops the save on
    both ranks; step_1 stays the newest COMPLETE checkpoint and no step_2 folder is written."""
    (tmp_path / "rank1_poison.py").write_text(RANK1_POISON)
    ckpt = make_hf_checkpoint("llama3")
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 16)
    out = tmp_path / "out"
    run = dt.torchrun(2, dt.DIST_RECIPE, "--config", "tiny/lora_distributed",
                      *common(ckpt, out, data, dt.TINY_TOKENIZER), "batch_size=2", "save_every_n_steps=1",
                      "save_merged=never", "gradient_accumulation_steps=1",
                      "optimizer._component_=rank1_poison.Rank1PoisonAdamW", "allowed_components=[rank1_poison.*]",
                      extra_env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode != 0
    assert "the trainable weights hold nan/inf after step 2" in run.stdout + run.stderr
    assert sorted(p.name for p in out.glob("step_*")) == ["step_1"] and (out / "step_1" / COMPLETE).is_file()


@pytest.mark.parametrize("kind,quantize", [("qwen3", None), ("qwen2", "nf4"), ("gemma3", None),
                                           ("phi3_longrope", None), ("qwen3_moe", None), ("qwen3_moe", "nf4"),
                                           ("gpt_oss_mxfp4", None), ("gpt_oss_mxfp4", "nf4")])
def test_other_families_two_ranks_match_one_device(tmp_path, make_hf_checkpoint, dt, kind, quantize):
    """Qwen3 (q/k norms, explicit head_dim, tied embeddings), Qwen2 (q/k/v biases, beside NF4
    weights) and Gemma 3 (four 1+w norms per layer, sliding layers), Phi-3 (fused projections,
    partial rotary) and Qwen3-MoE (each rank reads the experts it holds; expert LoRA; the
    load-balancing loss) and gpt-oss as the Hub stores it (each rank dequantizes the MXFP4
    experts it holds) sharded over 2 ranks: each rank reads its rows of every tensor, norms and
    biases included; the losses are one device's. QLoRA of the MoE models: every expert is
    quantized whole and each rank keeps its rows of every expert's NF4 storage. The
    load-balancing loss is each rank's own (of its micro-batch, as transformers computes it
    under DDP), not one device's over the global batch: on in the bf16 MoE runs (1e-4), off
    where the numbers must be one device's (1e-5)."""
    from tunelab.recipes import lora_finetune_single_device as single_recipe

    ckpt = make_hf_checkpoint(kind)
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 16)
    targets = {"phi3_longrope": "[qkv_proj,o_proj,gate_up_proj,down_proj]",
               "qwen3_moe": "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,experts]",
               "gpt_oss_mxfp4": "[q_proj,k_proj,v_proj,o_proj,experts]"}
    moe_aux = kind in ("qwen3_moe", "gpt_oss_mxfp4") and quantize is None
    extra = ("max_steps=2", "gradient_accumulation_steps=1", "save_merged=never", f"quantize={quantize or 'null'}",
             f"router_aux_loss={str(moe_aux).lower()}",
             *([f"lora.targets={targets[kind]}", "lora.dropout=0.0"] if kind in targets else []))
    run = dt.torchrun(2, dt.DIST_RECIPE, "--config", "tiny/lora_distributed",
                      *common(ckpt, tmp_path / "dist", data, dt.TINY_TOKENIZER), *extra, "batch_size=2")
    assert run.returncode == 0, run.stderr[-3000:]
    single_recipe.main(["--config", "tiny/lora", *common(ckpt, tmp_path / "single", data, dt.TINY_TOKENIZER),
                        *extra, "batch_size=4"])
    assert losses(tmp_path / "dist") == pytest.approx(losses(tmp_path / "single"), rel=1e-4 if moe_aux else 1e-5)


@pytest.mark.parametrize("quantize,shard_frozen", [("nf4", False)])
def test_dora_two_ranks_match_one_device(tmp_path, make_hf_checkpoint, dt, quantize, shard_frozen):
    """DoRA with FSDP: the magnitudes start at the full rows' norms on every rank (each layer
    gathered once for it; here an NF4 base replicated on every rank beside sharded magnitudes,
    the path with the most to get wrong; a dense sharded base takes the same calls); the losses
    and the saved adapter (magnitudes included) are one device's (fp32: losses 1e-5; the adapter
    after two AdamW steps 1e-4, as Adam divides by each element's own gradient scale, so an
    element whose gradient is ~0 moves by a fraction of lr on rounding alone)."""
    from tunelab.recipes import lora_finetune_single_device as single_recipe

    ckpt = make_hf_checkpoint("llama3")
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 16)
    extra = ("max_steps=2", "gradient_accumulation_steps=1", "save_merged=never", f"quantize={quantize or 'null'}",
             "lora.use_dora=true")
    run = dt.torchrun(2, dt.DIST_RECIPE, "--config", "tiny/lora_distributed",
                      *common(ckpt, tmp_path / "dist", data, dt.TINY_TOKENIZER), *extra, "batch_size=2",
                      f"fsdp.shard_frozen={str(shard_frozen).lower()}")
    assert run.returncode == 0, run.stderr[-3000:]
    single_recipe.main(["--config", "tiny/lora", *common(ckpt, tmp_path / "single", data, dt.TINY_TOKENIZER),
                        *extra, "batch_size=4"])
    assert losses(tmp_path / "dist") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    adapter = "step_2/adapter/adapter_model.safetensors"
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(tmp_path / "dist" / adapter)))
    assert_same_tensors(tmp_path / "dist", tmp_path / "single", adapter, atol=1e-4)


def test_full_finetune_two_ranks_match_one_device_and_resume(tmp_path, make_hf_checkpoint, dt):
    """full_finetune_distributed on 2 gloo ranks (every weight sharded, AdamWBF16 on the shards,
    accumulation 2, clipping) = full_finetune_single_device with the same global batch, fp32:
    losses 1e-5 and the saved HF folder 1e-4 (two AdamW steps: see the DoRA test); its state
    resumes on one device with the losses of an uninterrupted run."""
    from tunelab.recipes import full_finetune_single_device as single_recipe

    ckpt = make_hf_checkpoint("llama3")
    data = dt.alpaca_jsonl(tmp_path / "train.jsonl", 16)

    def argv(out, *extra):
        return [f"checkpoint_dir={ckpt}", f"tokenizer={dt.TINY_TOKENIZER}", f"output_dir={out}",
                f"dataset.source={data}", "validation=null", "eval_every_n_steps=null", "max_seq_len=64",
                "log_every_n_steps=1", "lr_scheduler.warmup_steps=1", "epochs=2", "max_steps=3",
                "gradient_accumulation_steps=2",
                "max_grad_norm=1.0", "save_every_n_steps=2", "keep_last_n_checkpoints=3", *extra]

    run = dt.torchrun(2, dt.REPO / "recipes" / "full_finetune_distributed.py", "--config", "tiny/full_distributed",
                      *argv(tmp_path / "dist", "batch_size=2"))
    assert run.returncode == 0, run.stderr[-3000:]
    single = ("--config", "tiny/full", "batch_size=4", "optimizer_in_backward=false", "heldout_accuracy=null")
    single_recipe.main([*single, *argv(tmp_path / "single")])
    assert losses(tmp_path / "dist") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert_same_tensors(tmp_path / "dist" / "step_3" / "merged", tmp_path / "single" / "step_3" / "merged",
                        "model.safetensors", atol=1e-4)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "dist", resumed)
    shutil.rmtree(resumed / "step_3")
    single_recipe.main([*single, *argv(resumed), "resume=true"])
    assert losses(resumed) == pytest.approx(losses(tmp_path / "dist"), rel=1e-5)


def test_grpo_on_two_ranks_trains_and_resumes_exactly(tmp_path, dt):
    """lora_grpo_distributed on 2 gloo ranks: each rank samples its own prompts' groups (decoding
    until both ranks' groups stop), dapo over both ranks' tokens; it trains, logs the metrics
    reduced over the ranks, and resuming from its step-1 checkpoint gives step 2 exactly."""
    recipe = dt.REPO / "recipes" / "lora_grpo_distributed.py"
    common = ("--config", "tiny/grpo_distributed", "log_every_n_steps=1", "max_steps=2", "save_every_n_steps=1",
              "keep_last_n_checkpoints=3", "save_merged=never", "grpo.max_completion_len=4")
    straight = dt.torchrun(2, recipe, *common, f"output_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "step_2")
    resumed = dt.torchrun(2, recipe, *common, "resume=true", f"output_dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "reward/mean" in r] for name in "ab"}
    assert len(rows["a"]) == 2 and {"reward/mean", "clip_ratio/region", "completion_len/max"} <= set(rows["a"][0])
    for key in ("reward/mean", "loss", "grad_norm"):
        assert [r[key] for r in rows["b"]] == [r[key] for r in rows["a"]], key
