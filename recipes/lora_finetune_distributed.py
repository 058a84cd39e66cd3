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
step for step (within float summation order).

What distribution changes in the step, and only that, differs from the single-device recipe:
each rank takes every N-th sample of the shared seeded order; the loss is the sum of token
cross-entropies over the whole global step divided by its label tokens (an all-reduced count);
FSDP averages gradients over ranks, so each rank scales its part by N; non-final micro-batches
skip the gradient reduce-scatter (``set_requires_gradient_sync(False)``); LoRA dropout masks
are seeded by (seed, step, rank).

Checkpoints have the single-device layout: all ranks gather the full adapter (and, for a
merged export, the full model) onto rank 0, which writes the step folder with COMPLETE last
while the others wait at a barrier. The data position is counted in global micro-batches, so a
checkpoint resumes on any world size (and with the single-device recipe) when ``batch_size x
world size`` stays the same. ``metrics.jsonl`` is written by rank 0; its ``tokens_per_s``
counts all ranks together. Setup, resume, logging and saving are ``tunelab.training.spine``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from tunelab.data.packing import PackedDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.metrics import Throughput
from tunelab.training.process_group import all_reduce_sum, exit_finished_run, say
from tunelab.training.spine import (
    DistributedConfig,
    RunLog,
    TrainConfig,
    build_dataset,
    build_model,
    build_optimizer,
    eval_sampler,
    plan_steps,
    restore_progress,
    save_checkpoint,
    save_final,
    start_run,
    train_sampler,
)
from tunelab.training.steps import (
    IGNORE_INDEX,
    RouterAuxLoss,
    clip_grad_norm,
    evaluate_loss,
    loss_sum,
    make_loader,
    optimizer_step,
    optimizer_steps,
)


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig(TrainConfig, DistributedConfig):
    """The shared keys (``TrainConfig``), the FSDP ones (``DistributedConfig``) and packing."""

    packing: bool


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    # join the process group, train, leave it (naming this rank if it fails)
    with start_run(cfg, "lora_finetune_distributed", distributed=True, compile=cfg.compile,
                   cpu_offload=cfg.fsdp.cpu_offload, offload_activations=cfg.offload_activations) as run:
        train(cfg, run)


def train(cfg: RecipeConfig, run) -> None:
    device, rank, world = run.device, run.rank, run.world
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)  # meta build, fully_shard, each rank reads its rows
    params = list(get_adapter_params(model).values())
    router_aux = RouterAuxLoss(model, cfg.router_aux_loss)  # MoE models: the load-balancing loss

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    train_data = PackedDataset(dataset, cfg.max_seq_len, pad_id=tokenizer.pad_id) if cfg.packing else dataset
    sampler = train_sampler(run, len(train_data))  # every N-th sample of the shared order
    loader = make_loader(train_data, cfg.batch_size, sampler, tokenizer.pad_id, cfg.packing)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(train_data), "packed rows" if cfg.packing else "samples")
    val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(run, cfg.validation, tokenizer, "validation")
        val_loader = make_loader(val_data, cfg.batch_size, eval_sampler(run, len(val_data)), tokenizer.pad_id,
                                 packed=False)

    optimizer, scheduler = build_optimizer(run, params, total_steps)
    # the data position counts GLOBAL micro-batches: a checkpoint resumes on any world size
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)  # rank 0 writes
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} x {world} samples each)")
    last_saved = run.resume_dir
    throughput = Throughput()  # tokens/s of training steps, all ranks together
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=run.global_batch,
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
                total = loss  # MoE: plus the load-balancing loss, weighted by the micro-batch's labels
                if router_aux:
                    total = loss + router_aux.loss() * int((batch["labels"] != IGNORE_INDEX).sum())
                (total * (world / n_labels)).backward()  # x world: FSDP averages over ranks
                step_loss += loss.detach()
            loss_value = all_reduce_sum([step_loss.item()], device)[0] / n_labels
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm)  # over all ranks' shards
            lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=loss_value, grad_norm=grad_norm,
                                last_saved=last_saved)
            progress.step += 1
            progress.batches_consumed += accum  # global micro-batches: the data position resume continues from
            throughput.step(n_tokens)

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                log.step({"step": step, "epoch": progress.epoch, "loss": loss_value, "lr": lr,
                          "tokens_per_s": throughput.rate(), "grad_norm": grad_norm, **router_aux.metrics()})
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_loss = evaluate_loss(model, val_loader, device)  # collective: every rank
                log.event({"step": step, "epoch": progress.epoch, "eval_loss": eval_loss},
                          f"step {step}: eval_loss={eval_loss:.4f}")
                throughput.resume()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = save_checkpoint(run, progress, model=model, optimizer=optimizer, scheduler=scheduler,
                                             final=False)  # collective: gathered onto rank 0
                throughput.resume()
    finally:
        log.close()

    # -------------------------------------------------------------------------------- final save
    save_final(run, progress, model=model, optimizer=optimizer, scheduler=scheduler)


if __name__ == "__main__":
    # record: torchrun's end-of-job summary then shows the failing rank's exception, not just its exit code
    recipe_entry(record(main))
    exit_finished_run()  # skip interpreter teardown (see its docstring)
