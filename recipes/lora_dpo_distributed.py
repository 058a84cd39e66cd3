"""Preference tuning (DPO, IPO, hinge, SimPO) with LoRA on several GPUs (or CPU processes) with FSDP2.

    tune run --nproc_per_node 2 lora_dpo_distributed --config llama3_1/8B_lora_dpo_distributed
    tune run --nproc_per_node 2 lora_dpo_distributed --config llama3_1/8B_lora_dpo_distributed quantize=nf4
    tune run --nproc_per_node 2 lora_dpo_distributed --config tiny/dpo_distributed    # CPU/gloo
    torchrun --nproc_per_node 2 lora_dpo_distributed.py --config my.yaml loss.type=ipo loss.beta=0.5

``lora_dpo_single_device``'s step on ``lora_finetune_distributed``'s sharded model. The model
is built on the meta device, LoRA applied, every decoder layer and the root ``fully_shard``-ed,
and each rank reads only its rows of the base weights (``quantize: nf4``: FSDP shards the
packed 4-bit storage). The reference is the same sharded model with its adapters switched off
under ``no_grad``; with ``precompute_ref_log_probs: true`` each rank scores a slice of the
pairs before training and one all-gather gives every rank the whole table
(``tunelab.training.dpo.precompute_reference``).

Numbers: each rank takes every N-th pair of the shared seeded order, so with ``batch_size`` b
on N ranks the pairs of a step are those of one device with ``batch_size`` b*N. The step loss
is the mean of the per-pair losses over all pairs of all ranks and micro-batches; FSDP
averages gradients over ranks, so each rank scales its sum by N / pairs-per-step. The logged
loss, rewards/chosen, rewards/rejected, rewards/accuracy and rewards/margins are sums
all-reduced over ranks and divided by the global pair count (``PairStats``), i.e. one device's
values for the same global batch (within float summation order). Validation uses the largest
multiple of N of its pairs (equal batch counts per rank). LoRA dropout masks are seeded by
(seed, step, rank).

Checkpoints have the single-device layout: every rank gathers the adapter (and, for a merged
export, the full model) onto rank 0, which writes ``step_N`` with COMPLETE last while the
others wait at a barrier. The data position counts global micro-batches, so a checkpoint
resumes on any world size (or with ``lora_dpo_single_device``) that keeps ``batch_size x world
size``. ``metrics.jsonl`` is written by rank 0; ``tokens_per_s`` counts all ranks together.
Setup, resume and saving are ``tunelab.training.distributed``'s, shared with
``lora_finetune_distributed``; the DPO pieces are ``tunelab.training.dpo``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training import distributed as dist_utils
from tunelab.training.config import component_field, instantiate, parse_recipe_args, recipe_entry
from tunelab.training.distributed import FSDPConfig, RankSampler, is_rank0, say
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
    check_settings,
    export_gguf_step,
    plan_steps,
    resolve_paths,
)
from tunelab.training.schedules import build_lr_scheduler
from tunelab.training.steps import apply_optimizer_step, optimizer_steps
from tunelab.training.utils import resolve_dtype, seed_everything


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig:
    """Every key is required in the YAML (the configs are the one source of defaults).
    ``batch_size`` counts preference PAIRS (each is two sequences) per rank."""

    checkpoint_dir: str  # HF folder (architecture from its config.json) or builtin:tiny
    output_dir: str  # must be on a filesystem every node sees for multi-node resume
    tokenizer: str | None  # null = the tokenizer inside checkpoint_dir
    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
    seed: int
    batch_size: int  # pairs per rank; global = batch_size x gradient_accumulation_steps x world size
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
    device: str  # auto | cpu | cuda (each rank uses cuda:LOCAL_RANK)
    dtype: Literal["bf16", "fp32"]
    fsdp: FSDPConfig
    dist_timeout_s: int  # a collective waiting longer than this fails the job instead of hanging
    activation_checkpointing: bool | int  # true: every layer; k: every k-th layer (selective); false: none
    offload_activations: bool  # layer inputs + attention in pinned CPU memory; attention not recomputed (CUDA)
    compile: bool
    max_grad_norm: float | None  # null = no clipping (the norm is still logged)
    log_every_n_steps: int
    metric_loggers: list[dict]  # extra loggers beside metrics.jsonl (TensorBoard, W&B), [] = none
    save_every_n_steps: int | None  # plus always at the end
    save_merged: Literal["final", "always", "never"]  # merged export holds the full model on rank 0
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
    dist_utils.check_distributed_settings(cfg)
    dist_utils.run_rank(train, cfg, recipe="lora_dpo_distributed")  # join the group, train, leave it


def train(cfg: RecipeConfig, device: torch.device) -> None:
    rank, world = dist_utils.rank(), dist_utils.world_size()
    manager, resume_dir = dist_utils.prepare_output_dir(cfg)  # rank 0 decides (and writes config.yaml)
    out = manager.output_dir
    resolve_paths(cfg)

    seed_everything(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)
    flags = dist_utils.cuda_only_settings(device, compile=cfg.compile, cpu_offload=cfg.fsdp.cpu_offload,
                                         offload_activations=cfg.offload_activations)
    cfg.fsdp.cpu_offload = flags["cpu_offload"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    args = dist_utils.read_model_args(cfg, tokenizer)
    model = dist_utils.setup_sharded_model(cfg, args, device, dtype, flags["compile"], flags["offload_activations"])
    params = list(get_adapter_params(model).values())
    dist_utils.say_model_size(model, cfg, device)
    say(f"loss {cfg.loss.type} (beta {cfg.loss.beta}), reference = the base model (adapters off)")

    dataset = dist_utils.build_dataset(cfg.dataset, tokenizer, cfg.max_seq_len, "dataset")
    accum, global_batch = cfg.gradient_accumulation_steps, cfg.batch_size * world
    steps_per_epoch, total_steps = plan_steps(cfg, len(dataset), "pairs", global_batch,
                                              "batch_size x gradient_accumulation_steps x world size")
    val_loader = None
    if cfg.validation is not None:
        val_data = dist_utils.build_dataset(cfg.validation, tokenizer, cfg.max_seq_len, "validation")
        val_loader = make_preference_loader(val_data, cfg.batch_size, dist_utils.eval_sampler(len(val_data)),
                                            tokenizer.pad_id, drop_last=False)
    if cfg.precompute_ref_log_probs:  # every rank a slice, then one all-gather: the whole table everywhere
        started = time.perf_counter()
        dataset = precompute_reference(model, dataset, cfg.batch_size, tokenizer.pad_id, device,
                                       rank=rank, world_size=world)
        say(f"reference log-probs of {len(dataset)} pairs precomputed in {time.perf_counter() - started:.1f}s")
    sampler = RankSampler(len(dataset), seed=cfg.seed, rank=rank, world_size=world)
    loader = make_preference_loader(dataset, cfg.batch_size, sampler, tokenizer.pad_id)

    optimizer = instantiate(cfg.optimizer, params)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps,
                                   total_steps=total_steps, schedule=cfg.lr_scheduler.schedule)
    # the data position counts GLOBAL micro-batches: a checkpoint resumes on any world size
    progress = dist_utils.restore_progress(cfg, resume_dir, global_batch, model=model, optimizer=optimizer,
                                           scheduler=scheduler, sampler=sampler)

    def checkpoint(final: bool) -> Path:
        """All ranks gather; rank 0 writes the step folder (COMPLETE last); all wait for it."""
        return dist_utils.save_checkpoint(cfg, manager, progress, model=model, optimizer=optimizer,
                                          scheduler=scheduler, dtype=dtype, final=final)

    # -------------------------------------------------------------------------------- loop
    metrics, display = dist_utils.rank0_metrics(cfg, out, progress.step, total_steps)  # None off rank 0
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} x {world} pairs each)")
    n_pairs = global_batch * accum  # the step loss is the mean over all pairs of all ranks
    last_saved = resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=global_batch,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            # dropout masks from (seed, step, rank): exact resume without per-rank RNG files
            torch.manual_seed(cfg.seed * 1_000_003 + progress.step * 1_009 + rank)
            stats = PairStats(device)
            for i, batch in enumerate(micro_batches):
                model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per step
                losses, chosen, rejected = pair_losses(model, batch, cfg, device)
                (losses.sum() * (world / n_pairs)).backward()  # x world: FSDP averages over ranks
                stats.add(losses, chosen, rejected, batch["num_tokens"])
            step_row, n_tokens = stats.reduce()  # all ranks: loss + rewards/* over the global step
            loss_value = step_row["loss"]
            grad_norm = dist_utils.clip_grad_norm(params, cfg.max_grad_norm)
            # finite check, optimizer + lr schedule step, training position + 1 step
            lr = apply_optimizer_step(progress, optimizer, scheduler, accum=accum, loss=loss_value,
                                      grad_norm=grad_norm, last_saved=last_saved, knobs="optimizer.lr or loss.beta")
            throughput.step(n_tokens)

            step = progress.step
            if is_rank0() and (step % cfg.log_every_n_steps == 0 or step in (1, total_steps)):
                row = {"step": step, "epoch": progress.epoch, **step_row, "lr": lr,
                       "tokens_per_s": throughput.rate(),  # all ranks together
                       "grad_norm": grad_norm}
                if (mem := peak_memory_gib(device)) is not None:
                    row["peak_mem_gib"] = mem  # rank 0's
                metrics.log(row)
                display.update(row)
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_row = evaluate(model, val_loader, cfg, device)  # collective: every rank
                if is_rank0():
                    metrics.log({"step": step, "epoch": progress.epoch, **eval_row})
                    display.write(f"step {step}: eval_loss={eval_row['eval_loss']:.4f} "
                                  f"eval_accuracy={eval_row['eval_rewards/accuracy']:.3f} "
                                  f"eval_margin={eval_row['eval_rewards/margins']:.3f}")
                throughput.resume()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = checkpoint(final=False)
                throughput.resume()
    finally:
        if is_rank0():
            display.close()
            metrics.close()

    # -------------------------------------------------------------------------------- final save
    done = last_saved is not None and last_saved.name == f"step_{total_steps}"  # resumed a finished run
    final_dir = last_saved if done else checkpoint(final=True)
    say(f"adapter: {final_dir / 'adapter'}")
    if (final_dir / "merged").is_dir():
        say(f"merged model: {final_dir / 'merged'}")
    # rank 0 exports alone (the others may finish: no collective waits on an export of minutes)
    if is_rank0() and (gguf := export_gguf_step(cfg, final_dir)) is not None:
        say(f"gguf: {gguf}")


if __name__ == "__main__":
    # record: torchrun's end-of-job summary then shows the failing rank's exception, not just its exit code
    recipe_entry(record(main))
    dist_utils.exit_finished_run()  # skip interpreter teardown (see its docstring)
