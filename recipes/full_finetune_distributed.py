"""Full fine-tuning of a Llama-family model on several GPUs (or CPU processes) with FSDP2.

    tune run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full_distributed
    tune run --nproc_per_node 2 full_finetune_distributed --config tiny/full_distributed   # CPU/gloo

``full_finetune_single_device``'s training, sharded: every weight trains and every weight,
gradient and optimizer state is split over the ranks (FSDP2 ``fully_shard`` per decoder layer
and the root, bf16 compute with fp32 gradient reduction on CUDA; fp32 on CPU); each rank reads
only its rows of the HF checkpoint. A run on N ranks with ``batch_size`` b matches one device
with ``batch_size`` b*N step for step (within float summation order). What distribution
changes in the step is what it changes in ``lora_finetune_distributed``: every N-th sample of
the shared order per rank, the loss over the all-reduced label count, gradients scaled by N for
FSDP's average, no reduce-scatter on non-final micro-batches.

The optimizer steps after backward here (gradient accumulation and global-norm clipping work
as usual): FSDP2 hands each rank its reduced gradient shard outside autograd's
per-parameter hooks, so the single-device recipe's ``optimizer_in_backward`` has nothing to
hook into; sharding already divides the gradients' memory by N. ``AdamWBF16`` (bf16 moments,
stochastic rounding) works on the shards.

Checkpoints: every save gathers the full model and optimizer state onto rank 0, which writes
the single-device layout (``step_N/merged``: the HF folder; ``step_N/state``: for resume, on any
world size with the same ``batch_size x world size``, or on one device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from tunelab.data.packing import PackedDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.metrics import Throughput
from tunelab.training.process_group import all_reduce_sum, exit_finished_run, say
from tunelab.training.spine import (
    BaseTrainConfig,
    DistributedConfig,
    RunLog,
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
class RecipeConfig(BaseTrainConfig, DistributedConfig):
    """The shared keys (``BaseTrainConfig``: no ``lora``), the FSDP ones (``DistributedConfig``)
    and packing."""

    packing: bool


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    # join the process group, train, leave it (naming this rank if it fails)
    with start_run(cfg, "full_finetune_distributed", distributed=True, compile=cfg.compile,
                   cpu_offload=cfg.fsdp.cpu_offload, offload_activations=cfg.offload_activations) as run:
        train(cfg, run)


def train(cfg: RecipeConfig, run) -> None:
    device, world = run.device, run.world
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)  # meta build, fully_shard, each rank reads its rows
    params = [p for p in model.parameters() if p.requires_grad]  # every weight (this rank's shards)
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
