"""Preference tuning (DPO, IPO, hinge, SimPO) with LoRA on one device (cuda or cpu).

    tune run lora_dpo_single_device --config llama3_1/8B_lora_dpo
    tune run lora_dpo_single_device --config llama3_1/8B_qlora_dpo  # NF4 base (QLoRA)
    tune run lora_dpo_single_device --config tiny/dpo               # ~1 min on a laptop CPU
    python lora_dpo_single_device.py --config my.yaml loss.type=ipo loss.beta=0.5

The policy is the base model + LoRA adapters. The reference is the SAME model with its
adapters switched off (``disable_adapters``) under ``no_grad``, so no second model sits in
memory: by default its log-probs are computed in each step, with
``precompute_ref_log_probs: true`` once for the whole dataset before training (cached in
memory, recomputed on resume; as TRL's ``precompute_ref_log_probs``). SimPO needs no reference.

One step: each micro-batch of ``batch_size`` pairs is ONE forward of 2 x batch_size rows
(chosen rows, then rejected rows; ``tunelab.data.preference_collate``); only the response
positions go through the output head (``sequence_log_probs_from_hidden``). The step loss is
the mean of the per-pair losses over all pairs of the step, so gradient accumulation gives the
update of one big batch. Metrics (``metrics.jsonl`` and the progress bar): loss,
rewards/chosen, rewards/rejected, rewards/accuracy (share of pairs whose chosen reward is
higher), rewards/margins; with ``validation`` the same with an ``eval_`` prefix.

Model setup, output folder, paths and checks are the LoRA recipes' (``tunelab.training.
recipe_setup``, so QLoRA via ``quantize: nf4`` works here exactly when it works there); the DPO
step pieces (log-probs, reference, losses, metrics) are ``tunelab.training.dpo``, shared with
``lora_dpo_distributed``; checkpoints, resume, RNG and data position go through
``tunelab.training``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training.checkpointing import ResumableSampler
from tunelab.training.config import component_field, instantiate, parse_recipe_args, recipe_entry, save_config
from tunelab.training.dpo import (
    LossConfig,
    PairStats,
    check_loss_settings,
    evaluate,
    make_preference_loader,
    pair_losses,
    precompute_reference,
)
from tunelab.training.metrics import Throughput, peak_memory_gib
from tunelab.training.recipe_setup import (
    GGUFExportConfig,
    LoRAConfig,
    LRSchedulerConfig,
    build_dataset,
    check_settings,
    check_vocab,
    count_parameters,
    export_gguf_step,
    open_metrics,
    plan_steps,
    prepare_output_dir,
    resolve_paths,
    restore_progress,
    save_checkpoint,
    setup_model,
)
from tunelab.training.schedules import build_lr_scheduler
from tunelab.training.steps import apply_optimizer_step, optimizer_steps
from tunelab.training.utils import cuda_only_settings_notice, resolve_device, resolve_dtype, seed_everything


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig:
    """Every key is required in the YAML (the configs are the one source of defaults).
    ``batch_size`` counts preference PAIRS (each is two sequences)."""

    checkpoint_dir: str  # HF folder (architecture from its config.json) or builtin:tiny
    output_dir: str
    tokenizer: str | None  # null = the tokenizer inside checkpoint_dir
    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
    seed: int
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    max_steps: int | None  # cap on optimizer steps
    max_seq_len: int  # per side: prompt + response
    optimizer: dict = component_field(provided=("params",))
    lr_scheduler: LRSchedulerConfig
    lora: LoRAConfig
    loss: LossConfig
    precompute_ref_log_probs: bool
    quantize: Literal["nf4"] | None
    device: str  # auto | cpu | cuda | cuda:N
    dtype: Literal["bf16", "fp32"]
    activation_checkpointing: bool | int  # true: every layer; k: every k-th layer (selective); false: none
    offload_activations: bool  # layer inputs + attention in pinned CPU memory; attention not recomputed (CUDA)
    compile: bool
    max_grad_norm: float | None  # null = no clipping (the norm is still logged)
    log_every_n_steps: int
    metric_loggers: list[dict]  # extra loggers beside metrics.jsonl (TensorBoard, W&B), [] = none
    save_every_n_steps: int | None  # plus always at the end
    save_merged: Literal["final", "always", "never"]
    export_gguf: GGUFExportConfig | None  # {dtype: f16|bf16|q8_0|q4_k_m}: a .gguf of the final model
    keep_last_n_checkpoints: int
    validation: dict | None = component_field(provided=("tokenizer", "max_seq_len"))
    eval_every_n_steps: int | None
    resume: bool


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_settings(cfg)
    check_loss_settings(cfg)
    manager, resume_dir = prepare_output_dir(cfg)
    out = manager.output_dir
    save_config(cfg, out / "config.yaml")  # as given (builtin: names kept), before resolving
    resolve_paths(cfg)

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    flags = cuda_only_settings_notice(device, compile=cfg.compile, offload_activations=cfg.offload_activations)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = setup_model(cfg, device, dtype, flags["compile"], flags["offload_activations"])
    check_vocab(tokenizer, model.args.vocab_size)
    params = list(get_adapter_params(model).values())
    n_params, n_trainable = count_parameters(model)
    print(f"model: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable (LoRA rank "
          f"{cfg.lora.rank}) on {device} in {cfg.dtype}; loss {cfg.loss.type} (beta {cfg.loss.beta})")

    dataset = build_dataset(cfg.dataset, tokenizer, cfg.max_seq_len, "dataset")
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(cfg, len(dataset), "pairs", cfg.batch_size,
                                              "batch_size x gradient_accumulation_steps")
    val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(cfg.validation, tokenizer, cfg.max_seq_len, "validation")
        val_loader = make_preference_loader(val_data, cfg.batch_size, ResumableSampler(len(val_data), 0, shuffle=False),
                                            tokenizer.pad_id, drop_last=False)
    if cfg.precompute_ref_log_probs:
        started = time.perf_counter()
        dataset = precompute_reference(model, dataset, cfg.batch_size, tokenizer.pad_id, device)
        print(f"reference log-probs of {len(dataset)} pairs precomputed in {time.perf_counter() - started:.1f}s")
    sampler = ResumableSampler(len(dataset), seed=cfg.seed)
    loader = make_preference_loader(dataset, cfg.batch_size, sampler, tokenizer.pad_id)

    optimizer = instantiate(cfg.optimizer, params)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps,
                                   total_steps=total_steps, schedule=cfg.lr_scheduler.schedule)
    progress = restore_progress(cfg, resume_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                sampler=sampler)

    def checkpoint(final: bool) -> Path:
        return save_checkpoint(cfg, manager, progress, model=model, optimizer=optimizer, scheduler=scheduler,
                               final=final)

    # -------------------------------------------------------------------------------- loop
    metrics, display = open_metrics(cfg, out, progress.step, total_steps)  # resumes: later rows dropped
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} pairs each)")
    last_saved = resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            n_pairs = cfg.batch_size * accum  # the step loss is the mean over all its pairs
            stats = PairStats(device)
            for batch in micro_batches:
                losses, chosen, rejected = pair_losses(model, batch, cfg, device)
                (losses.sum() / n_pairs).backward()
                stats.add(losses, chosen, rejected, batch["num_tokens"])
            step_row, n_tokens = stats.reduce()  # loss + rewards/*: means over the step's pairs
            loss_value = step_row["loss"]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf).item()
            # finite check, optimizer + lr schedule step, training position + 1 step
            lr = apply_optimizer_step(progress, optimizer, scheduler, accum=accum, loss=loss_value,
                                      grad_norm=grad_norm, last_saved=last_saved, knobs="optimizer.lr or loss.beta")
            throughput.step(n_tokens)

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                row = {"step": step, "epoch": progress.epoch, **step_row, "lr": lr,
                       "tokens_per_s": throughput.rate(), "grad_norm": grad_norm}
                if (mem := peak_memory_gib(device)) is not None:
                    row["peak_mem_gib"] = mem
                metrics.log(row)
                display.update(row)
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_row = {"step": step, "epoch": progress.epoch, **evaluate(model, val_loader, cfg, device)}
                metrics.log(eval_row)
                display.write(f"step {step}: eval_loss={eval_row['eval_loss']:.4f} "
                              f"eval_accuracy={eval_row['eval_rewards/accuracy']:.3f} "
                              f"eval_margin={eval_row['eval_rewards/margins']:.3f}")
                throughput.resume()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = checkpoint(final=False)
                throughput.resume()
    finally:
        display.close()
        metrics.close()

    # -------------------------------------------------------------------------------- final save
    done = last_saved is not None and last_saved.name == f"step_{total_steps}"  # resumed a finished run
    final_dir = last_saved if done else checkpoint(final=True)
    print(f"adapter: {final_dir / 'adapter'}")
    if (final_dir / "merged").is_dir():
        print(f"merged model: {final_dir / 'merged'}")
    if (gguf := export_gguf_step(cfg, final_dir)) is not None:
        print(f"gguf: {gguf}")


if __name__ == "__main__":
    recipe_entry(main)
