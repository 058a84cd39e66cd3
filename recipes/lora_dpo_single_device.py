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

Setup, resume, logging and saving are the shared spine's (``tunelab.training.spine``, so QLoRA
via ``quantize: nf4`` works here exactly when it works in the LoRA recipes); the DPO step
pieces (log-probs, reference, losses, metrics) are ``tunelab.training.dpo``, shared with
``lora_dpo_distributed``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.heldout import HeldOut
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
from tunelab.training.spine import (
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
class RecipeConfig(TrainConfig, DPOFields):
    """The shared keys (``TrainConfig``) and the DPO ones (``loss``, ``precompute_ref_log_probs``).
    ``batch_size`` counts preference PAIRS (each is two sequences); ``max_seq_len`` is per side."""

    heldout_accuracy: int | None = None  # validation prompts whose greedy answer is checked against chosen, before and after


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_loss_settings(cfg)
    with start_run(cfg, "lora_dpo_single_device", compile=cfg.compile,
                   offload_activations=cfg.offload_activations) as run:
        train(cfg, run)


def train(cfg: RecipeConfig, run) -> None:
    device = run.device
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)
    params = list(get_adapter_params(model).values())
    router_aux = RouterAuxLoss(model, cfg.router_aux_loss)  # MoE models: the load-balancing loss
    print(f"loss {cfg.loss.type} (beta {cfg.loss.beta}), reference = the base model (adapters off)")

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(dataset), "pairs")
    val_data = val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(run, cfg.validation, tokenizer, "validation")
        val_loader = make_preference_loader(val_data, cfg.batch_size, eval_sampler(run, len(val_data)),
                                            tokenizer.pad_id, drop_last=False, loss_type=cfg.loss.type)
    # held-out prompts, answered before training (adapters off: the base model) and after it;
    # the chosen answer is the reference
    heldout = HeldOut(model, tokenizer, cfg.heldout_accuracy, val_data, dataset)
    if cfg.precompute_ref_log_probs:
        started = time.perf_counter()
        dataset = precompute_reference(model, dataset, cfg.batch_size, tokenizer.pad_id, device)
        print(f"reference log-probs of {len(dataset)} pairs precomputed in {time.perf_counter() - started:.1f}s")
    sampler = train_sampler(run, len(dataset))
    loader = make_preference_loader(dataset, cfg.batch_size, sampler, tokenizer.pad_id, loss_type=cfg.loss.type)

    optimizer, scheduler = build_optimizer(run, params, total_steps)
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)  # resumes: later rows dropped
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} pairs each)")
    last_saved = run.resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    n_pairs = cfg.batch_size * accum  # the step loss is the mean over all its pairs
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            stats = PairStats(device)
            for batch in micro_batches:
                out = pair_losses(model, batch, cfg, device)  # per pair (KTO: per row) losses, rewards
                total = out.losses.sum()  # MoE: plus the policy forward's load-balancing loss, per pair
                if router_aux:
                    total = total + router_aux.loss() * len(out.losses)
                (total / n_pairs).backward()
                stats.add(out, batch["num_tokens"])
            step_row, n_tokens = stats.reduce()  # loss + rewards/*: means over the step's pairs
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
            lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=step_row["loss"],
                                grad_norm=grad_norm, last_saved=last_saved, knobs="optimizer.lr or loss.beta")
            progress.step += 1
            progress.batches_consumed += accum  # the data position resume continues from
            throughput.step(n_tokens)

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                log.step({"step": step, "epoch": progress.epoch, **step_row, **router_aux.metrics(), "lr": lr,
                          "tokens_per_s": throughput.rate(), "grad_norm": grad_norm})
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_row = evaluate(model, val_loader, cfg, device)
                log.event({"step": step, "epoch": progress.epoch, **eval_row}, eval_line(step, eval_row))
                throughput.resume()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = save_checkpoint(run, progress, model=model, optimizer=optimizer, scheduler=scheduler,
                                             final=False)
                throughput.resume()
    finally:
        log.close()

    # -------------------------------------------------------------------------------- final save
    save_final(run, progress, model=model, optimizer=optimizer, scheduler=scheduler)
    heldout.report(model)


if __name__ == "__main__":
    recipe_entry(main)
