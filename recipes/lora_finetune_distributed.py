"""LoRA fine-tuning of a Llama-family model on several GPUs (or CPU processes) with FSDP2.

    tune run --nproc_per_node 8 lora_finetune_distributed --config llama3_1/70B_lora_distributed
    tune run --nproc_per_node 2 lora_finetune_distributed --config tiny/lora_distributed   # CPU/gloo
    torchrun --nproc_per_node 2 lora_finetune_distributed.py --config my.yaml lora.rank=8
    # several nodes: the same command on each (checkpoint_dir readable and output_dir shared by all)
    tune run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 \
        --rdzv_id run1 lora_finetune_distributed --config llama3_1/70B_lora_distributed

The single-device recipe's shape and numbers, sharded: the model is built on the meta device,
LoRA is applied, each decoder layer and then the root are wrapped by ``fully_shard`` (bf16
compute with fp32 gradient reduction on CUDA; fp32 on CPU), each rank allocates only its shard
and reads only its rows of the HF safetensors files, file by file. With ``quantize: nf4``
(QLoRA) the decoder projections are NF4 and FSDP shards and all-gathers their packed 4-bit
storage. The LoRA weights are initialised with exactly the values one device would draw (same
seed), so a run on N ranks with ``batch_size`` b matches one device with ``batch_size`` b*N
step for step (within float summation order). Each rank takes every N-th sample of the shared
seeded order; the loss is the sum of token cross-entropies over the whole global step divided
by its label tokens (an all-reduced count); FSDP averages gradients over ranks, so each rank
scales its part by N. Non-final micro-batches skip the gradient reduce-scatter
(``set_requires_gradient_sync(False)``). LoRA dropout masks are seeded by (seed, step, rank).

Checkpoints have the single-device layout (``tunelab.training.checkpointing``): all ranks
gather the full adapter (and, for a merged export, the full model) onto rank 0, which writes
the step folder with COMPLETE last while the others wait at a barrier. The data position is
counted in global micro-batches, so a checkpoint resumes on any world size (and with the
single-device recipe) when ``batch_size x world size`` stays the same. ``metrics.jsonl``
is written by rank 0; its ``tokens_per_s`` counts all ranks together. Setup, resume and saving
are ``tunelab.training.distributed``'s, shared with ``lora_dpo_distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from tunelab.data.packing import PackedDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training import distributed as dist_utils
from tunelab.training.config import component_field, instantiate, parse_recipe_args, recipe_entry
from tunelab.training.distributed import FSDPConfig, RankSampler, all_reduce_sum, is_rank0, say
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
from tunelab.training.steps import IGNORE_INDEX, apply_optimizer_step, loss_sum, make_loader, optimizer_steps
from tunelab.training.utils import resolve_dtype, seed_everything


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig:
    """Every key is required in the YAML (the configs are the one source of defaults)."""

    checkpoint_dir: str  # HF folder (architecture from its config.json) or builtin:tiny
    output_dir: str  # must be on a filesystem every node sees for multi-node resume
    tokenizer: str | None  # null = the tokenizer inside checkpoint_dir
    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
    seed: int
    batch_size: int  # per rank; global = batch_size x gradient_accumulation_steps x world size
    gradient_accumulation_steps: int
    epochs: int
    max_steps: int | None  # cap on optimizer steps
    max_seq_len: int
    packing: bool
    optimizer: dict = component_field(provided=("params",))
    lr_scheduler: LRSchedulerConfig
    lora: LoRAConfig
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


# ------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def evaluate(model, loader, device: torch.device) -> float:
    """Mean token loss over every rank's validation batches (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        total += loss_sum(model, batch, device).item()
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train()
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_settings(cfg)
    dist_utils.check_distributed_settings(cfg)
    dist_utils.run_rank(train, cfg, recipe="lora_finetune_distributed")  # join the group, train, leave it


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

    dataset = dist_utils.build_dataset(cfg.dataset, tokenizer, cfg.max_seq_len, "dataset")
    train_data = PackedDataset(dataset, cfg.max_seq_len, pad_id=tokenizer.pad_id) if cfg.packing else dataset
    sampler = RankSampler(len(train_data), seed=cfg.seed, rank=rank, world_size=world)
    loader = make_loader(train_data, cfg.batch_size, sampler, tokenizer.pad_id, cfg.packing)
    accum, global_batch = cfg.gradient_accumulation_steps, cfg.batch_size * world
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_data), "packed rows" if cfg.packing else "samples",
                                              global_batch, "batch_size x gradient_accumulation_steps x world size")
    val_loader = None
    if cfg.validation is not None:
        val_data = dist_utils.build_dataset(cfg.validation, tokenizer, cfg.max_seq_len, "validation")
        val_loader = make_loader(val_data, cfg.batch_size, dist_utils.eval_sampler(len(val_data)),
                                 tokenizer.pad_id, packed=False)

    optimizer = instantiate(cfg.optimizer, params)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps,
                                   total_steps=total_steps, schedule=cfg.lr_scheduler.schedule)
    # the data position counts GLOBAL micro-batches: a checkpoint resumes on any world size
    progress = dist_utils.restore_progress(cfg, resume_dir, global_batch, model=model, optimizer=optimizer,
                                           scheduler=scheduler, sampler=sampler)

    def save_checkpoint(final: bool) -> Path:
        """All ranks gather; rank 0 writes the step folder (COMPLETE last); all wait for it."""
        return dist_utils.save_checkpoint(cfg, manager, progress, model=model, optimizer=optimizer,
                                          scheduler=scheduler, dtype=dtype, final=final)

    # -------------------------------------------------------------------------------- loop
    metrics, display = dist_utils.rank0_metrics(cfg, out, progress.step, total_steps)  # None off rank 0
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} x {world} samples each)")
    last_saved = resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=global_batch,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            # dropout masks from (seed, step, rank): exact resume without per-rank RNG files
            torch.manual_seed(cfg.seed * 1_000_003 + progress.step * 1_009 + rank)
            # normalise by the label tokens of the whole global step, not per micro-batch or rank
            local_labels = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
            n_labels, n_tokens = all_reduce_sum([local_labels, sum(b["num_tokens"] for b in micro_batches)], device)
            n_labels = max(n_labels, 1.0)
            step_loss = torch.zeros((), device=device)
            for i, batch in enumerate(micro_batches):
                model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per step
                loss = loss_sum(model, batch, device)
                (loss * (world / n_labels)).backward()  # x world: FSDP averages over ranks
                step_loss += loss.detach()
            loss_value = all_reduce_sum([step_loss.item()], device)[0] / n_labels
            grad_norm = dist_utils.clip_grad_norm(params, cfg.max_grad_norm)
            # finite check, optimizer + lr schedule step, training position + 1 step
            lr = apply_optimizer_step(progress, optimizer, scheduler, accum=accum, loss=loss_value,
                                      grad_norm=grad_norm, last_saved=last_saved)
            throughput.step(n_tokens)

            step = progress.step
            if is_rank0() and (step % cfg.log_every_n_steps == 0 or step in (1, total_steps)):
                row = {"step": step, "epoch": progress.epoch, "loss": loss_value, "lr": lr,
                       "tokens_per_s": throughput.rate(),  # all ranks together
                       "grad_norm": grad_norm}
                if (mem := peak_memory_gib(device)) is not None:
                    row["peak_mem_gib"] = mem  # rank 0's
                metrics.log(row)
                display.update(row)
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_loss = evaluate(model, val_loader, device)
                if is_rank0():
                    metrics.log({"step": step, "epoch": progress.epoch, "eval_loss": eval_loss})
                    display.write(f"step {step}: eval_loss={eval_loss:.4f}")
                throughput.resume()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = save_checkpoint(final=False)
                throughput.resume()
    finally:
        if is_rank0():
            display.close()
            metrics.close()

    # -------------------------------------------------------------------------------- final save
    final_dir = save_checkpoint(final=True) if last_saved is None or last_saved.name != f"step_{total_steps}" else last_saved
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
