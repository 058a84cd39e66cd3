"""GRPO with LoRA (or QLoRA) on several GPUs (or CPU processes) with FSDP2.

    tune run --nproc_per_node 2 lora_grpo_distributed --config tiny/grpo_distributed   # CPU/gloo
    (an 8B run: a single-device GRPO config plus the fsdp: and dist_timeout_s: keys)

``lora_grpo_single_device``'s step, sharded: the LoRA model is FSDP2-wrapped as in
``lora_finetune_distributed``; each rank takes every N-th prompt of the shared order and samples
its prompts' groups itself (a group never spans ranks, so the group statistics are local), with
a generator seeded by (seed, step, rank). What distribution changes: every decode step is a
collective (the layers are all-gathered), so a rank whose groups have all stopped keeps
stepping until every rank's have (``all_finished``); ``dapo`` divides by the completion tokens
of the whole step over all ranks (one all-reduce) and scales its gradient by N for FSDP's
average; the logged metrics are reduced over all ranks. ``scale_rewards: batch`` (a std over
every rank's rewards) is not offered here yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

from tunelab.data.prompts import PromptDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.errors import ConfigError
from tunelab.modules.peft import get_adapter_params
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.grpo import (
    GRPOFields,
    check_grpo_settings,
    reference_log_probs,
    roll_out,
    rollout_backward,
    step_metrics,
)
from tunelab.training.rewards import build_rewards
from tunelab.training.process_group import all_reduce_sum, exit_finished_run, say
from tunelab.training.spine import (
    DistributedConfig,
    RunLog,
    TrainConfig,
    build_dataset,
    build_model,
    build_optimizer,
    plan_steps,
    restore_progress,
    save_checkpoint,
    save_final,
    start_run,
    train_sampler,
)
from tunelab.training.steps import clip_grad_norm, optimizer_step, optimizer_steps


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig(TrainConfig, GRPOFields, DistributedConfig):
    """The shared keys (``TrainConfig``; ``batch_size`` counts prompts per rank), GRPO's
    (``GRPOFields``) and the FSDP ones (``DistributedConfig``)."""


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_grpo_settings(cfg)
    if cfg.grpo.scale_rewards == "batch":
        raise ConfigError("grpo.scale_rewards: batch is not offered in the FSDP recipe yet (its std spans every "
                          "rank's rewards); use group or none")
    rewards = build_rewards(cfg.rewards, cfg.allowed_components)  # before the model: a bad reward fails fast
    with start_run(cfg, "lora_grpo_distributed", distributed=True, compile=cfg.compile,
                   cpu_offload=cfg.fsdp.cpu_offload, offload_activations=cfg.offload_activations) as run:
        train(cfg, run, rewards)


def train(cfg: RecipeConfig, run, rewards) -> None:
    device, g, rank, world = run.device, cfg.grpo, run.rank, run.world
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)  # meta build, fully_shard, each rank reads its rows
    params = list(get_adapter_params(model).values())

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    if not isinstance(dataset, PromptDataset):
        raise ConfigError("dataset: GRPO samples its own completions from prompt rows; use "
                          "dataset._component_: tunelab.data.prompt_dataset")
    sampler = train_sampler(run, len(dataset))  # every N-th prompt of the shared order
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=list, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(dataset), "prompts")
    optimizer, scheduler = build_optimizer(run, params, total_steps * g.num_iterations)
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)
    say(f"training {total_steps} steps ({cfg.batch_size} x {accum} x {world} prompts x {g.num_generations} "
        f"completions each, {g.num_iterations} update(s) per batch, loss {g.loss_type})")

    def all_finished(done: bool) -> bool:  # decode steps are collectives: stop when every rank is done
        return all_reduce_sum([0.0 if done else 1.0], device)[0] == 0
    last_saved = run.resume_dir
    step_rewards: list[float] = []  # mean reward of each step this run took (for the before -> after line)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=run.global_batch,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            started = time.perf_counter()
            # sampling from (seed, step, rank): exact resume without per-rank RNG files
            sampling = torch.Generator().manual_seed((cfg.seed * 1_000_003 + progress.step) * 1_009 + rank)
            failures_before = rewards.failures
            rollouts = [roll_out(model, items, tokenizer, rewards, num_generations=g.num_generations,
                                 max_completion_len=g.max_completion_len, temperature=g.temperature, top_k=g.top_k,
                                 top_p=g.top_p, scale_rewards=g.scale_rewards, generator=sampling,
                                 all_finished=all_finished)
                        for items in micro_batches]
            rollout_seconds = time.perf_counter() - started
            # dapo's normaliser: the completion tokens of the whole step, all ranks
            active = all_reduce_sum([sum(int(r.mask.sum()) for r in rollouts)], device)[0]
            old, ref = reference_log_probs(model, rollouts, g, device)
            updates = []
            for _ in range(g.num_iterations):  # optimizer steps on this batch
                updates.append(rollout_backward(model, rollouts, g, old, ref, device, accum=accum,
                                                active_tokens=active, world=world))
                grad_norm = clip_grad_norm(params, cfg.max_grad_norm)  # over all ranks' shards
                lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=updates[-1].loss,
                                    grad_norm=grad_norm, last_saved=last_saved)
            progress.step += 1
            progress.batches_consumed += accum  # global micro-batches: the data position resume continues from
            train_seconds = time.perf_counter() - started - rollout_seconds

            step = progress.step
            metrics = step_metrics(rollouts, updates, active, device)  # collective: reduced over the ranks
            failures, tokens = all_reduce_sum([rewards.failures - failures_before,
                                               sum(r.num_tokens for r in rollouts)], device)
            step_rewards.append(metrics["reward/mean"])
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                log.step({"step": step, "epoch": progress.epoch, **metrics, "reward_failures": int(failures), "lr": lr, "grad_norm": grad_norm,
                          "rollout_tokens_per_s": tokens / max(rollout_seconds, 1e-9),
                          "tokens_per_s": tokens * g.num_iterations / max(train_seconds, 1e-9)})
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = save_checkpoint(run, progress, model=model, optimizer=optimizer, scheduler=scheduler,
                                             final=False)
    finally:
        log.close()

    # -------------------------------------------------------------------------------- final save
    save_final(run, progress, model=model, optimizer=optimizer, scheduler=scheduler)
    if step_rewards:  # one step's mean is noisy: compare the first and the last tenth of the run (up to 10 steps)
        k = max(1, min(10, len(step_rewards) // 10))
        say(f"mean reward: {sum(step_rewards[:k]) / k:.3f} over the first {k} step(s) -> "
              f"{sum(step_rewards[-k:]) / k:.3f} over the last {k}")


if __name__ == "__main__":
    # record: torchrun's end-of-job summary then shows the failing rank's exception, not just its exit code
    recipe_entry(record(main))
    exit_finished_run()  # skip interpreter teardown (see its docstring)
