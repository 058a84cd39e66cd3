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
Setup, resume, logging and saving are ``tunelab.training.spine``'s, as in every recipe; the
DPO pieces are ``tunelab.training.dpo``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.dpo import (
    DPOFields,
    PairStats,
    check_loss_settings,
    eval_line,
    evaluate,
    make_preference_loader,
    pair_losses,
    precompute_reference,
)
from tunelab.training.metrics import Throughput
from tunelab.training.process_group import exit_finished_run, say
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
from tunelab.training.steps import RouterAuxLoss, clip_grad_norm, optimizer_step, optimizer_steps


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig(TrainConfig, DPOFields, DistributedConfig):
    """The shared keys (``TrainConfig``), the DPO ones and the FSDP ones. ``batch_size`` counts
    preference PAIRS (each is two sequences) per rank; ``max_seq_len`` is per side."""


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_loss_settings(cfg)
    # join the process group, train, leave it (naming this rank if it fails)
    with start_run(cfg, "lora_dpo_distributed", distributed=True, compile=cfg.compile,
                   cpu_offload=cfg.fsdp.cpu_offload, offload_activations=cfg.offload_activations) as run:
        train(cfg, run)


def train(cfg: RecipeConfig, run) -> None:
    device, rank, world = run.device, run.rank, run.world
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)  # meta build, fully_shard, each rank reads its rows
    params = list(get_adapter_params(model).values())
    router_aux = RouterAuxLoss(model, cfg.router_aux_loss)  # MoE models: the load-balancing loss
    say(f"loss {cfg.loss.type} (beta {cfg.loss.beta}), reference = the base model (adapters off)")

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(dataset), "pairs")
    val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(run, cfg.validation, tokenizer, "validation")
        val_loader = make_preference_loader(val_data, cfg.batch_size, eval_sampler(run, len(val_data)),
                                            tokenizer.pad_id, drop_last=False, loss_type=cfg.loss.type)
    if cfg.precompute_ref_log_probs:  # every rank a slice, then one all-gather: the whole table everywhere
        started = time.perf_counter()
        dataset = precompute_reference(model, dataset, cfg.batch_size, tokenizer.pad_id, device,
                                       rank=rank, world_size=world)
        say(f"reference log-probs of {len(dataset)} pairs precomputed in {time.perf_counter() - started:.1f}s")
    sampler = train_sampler(run, len(dataset))  # every N-th pair of the shared order
    loader = make_preference_loader(dataset, cfg.batch_size, sampler, tokenizer.pad_id, loss_type=cfg.loss.type)

    optimizer, scheduler = build_optimizer(run, params, total_steps)
    # the data position counts GLOBAL micro-batches: a checkpoint resumes on any world size
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)  # rank 0 writes
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} x {world} pairs each)")
    last_saved = run.resume_dir
    throughput = Throughput()  # tokens/s of training steps, all ranks together
    n_pairs = run.global_batch * accum  # the step loss is the mean over all pairs of all ranks
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=run.global_batch,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            # dropout masks from (seed, step, rank): exact resume without per-rank RNG files
            torch.manual_seed(cfg.seed * 1_000_003 + progress.step * 1_009 + rank)
            stats = PairStats(device)
            for i, batch in enumerate(micro_batches):
                model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per step
                out = pair_losses(model, batch, cfg, device)  # per pair (KTO: per row) losses, rewards
                total = out.losses.sum()  # MoE: plus the policy forward's load-balancing loss, per pair
                if router_aux:
                    total = total + router_aux.loss() * len(out.losses)
                (total * (world / n_pairs)).backward()  # x world: FSDP averages over ranks
                stats.add(out, batch["num_tokens"])
            step_row, n_tokens = stats.reduce()  # all ranks: loss + rewards/* over the global step
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm)  # over all ranks' shards
            lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=step_row["loss"],
                                grad_norm=grad_norm, last_saved=last_saved, knobs="optimizer.lr or loss.beta")
            progress.step += 1
            progress.batches_consumed += accum  # global micro-batches: the data position resume continues from
            throughput.step(n_tokens)

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                log.step({"step": step, "epoch": progress.epoch, **step_row, **router_aux.metrics(), "lr": lr,
                          "tokens_per_s": throughput.rate(), "grad_norm": grad_norm})
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_row = evaluate(model, val_loader, cfg, device)  # collective: every rank
                log.event({"step": step, "epoch": progress.epoch, **eval_row}, eval_line(step, eval_row))
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
