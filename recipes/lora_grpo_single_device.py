"""GRPO with LoRA (or QLoRA) on one device: online reinforcement learning from programmatic rewards.

    tune run lora_grpo_single_device --config tiny/grpo            # CPU
    tune run lora_grpo_single_device --config qwen3/8B_qlora_grpo

Read top to bottom: settings, setup, the loop, the final save. Each optimizer step takes
``batch_size`` prompts per micro-batch, ``gradient_accumulation_steps`` micro-batches, and:

1. samples ``grpo.num_generations`` completions of every prompt from the policy itself (LoRA
   adapters live, KV cache; ``tunelab.training.grpo``), with a sampling generator seeded by
   (seed, step), so a resumed run samples exactly what an uninterrupted one would;
2. scores them with the ``rewards`` (weighted sum; a reward that raises scores 0 and is
   counted) and turns the scores into group-relative advantages;
3. takes ``grpo.num_iterations`` optimizer steps on that batch with the clipped-ratio loss of
   ``tunelab.modules.loss.grpo`` (the old log-probs: the sampling policy's), optionally with a
   KL penalty (``grpo.beta``) to the reference = the model with its adapters off.

``dapo`` (the default ``loss_type``, TRL's) divides by the completion tokens of the whole step,
so every token weighs the same; ``grpo``/``bnpo``/``dr_grpo`` average per micro-batch and are
divided by the accumulation. Metrics: ``reward/mean``, ``reward/std``, ``reward/<name>`` per
reward, ``completion_len/mean`` and ``/max``, ``clip_ratio/low``, ``/high`` and ``/region``, ``kl`` (beta > 0),
``reward_failures``, rollout and training tokens/s. The run prints the mean reward of its first
and last steps (the first and last tenth of the run, up to 10 steps each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
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
from tunelab.training.spine import (
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
class RecipeConfig(TrainConfig, GRPOFields):
    """The shared keys (``TrainConfig``; ``batch_size`` counts prompts, ``max_seq_len`` bounds
    the prompt) and GRPO's (``GRPOFields``: ``grpo`` and the ``rewards`` list)."""


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_grpo_settings(cfg)
    rewards = build_rewards(cfg.rewards, cfg.allowed_components)  # before the model: a bad reward fails fast
    with start_run(cfg, "lora_grpo_single_device", compile=cfg.compile,
                   offload_activations=cfg.offload_activations) as run:
        train(cfg, run, rewards)


def train(cfg: RecipeConfig, run, rewards) -> None:
    device, g = run.device, cfg.grpo
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)
    params = list(get_adapter_params(model).values())

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    if not isinstance(dataset, PromptDataset):
        raise ConfigError("dataset: GRPO samples its own completions from prompt rows; use "
                          "dataset._component_: tunelab.data.prompt_dataset")
    sampler = train_sampler(run, len(dataset))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=list, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(dataset), "prompts")
    optimizer, scheduler = build_optimizer(run, params, total_steps * g.num_iterations)
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)
    print(f"training {total_steps} steps ({cfg.batch_size} x {accum} prompts x {g.num_generations} completions each, "
          f"{g.num_iterations} update(s) per batch, loss {g.loss_type})")
    last_saved = run.resume_dir
    step_rewards: list[float] = []  # mean reward of each step this run took (for the before -> after line)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            started = time.perf_counter()
            sampling = torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress.step)  # exact resume
            failures_before = rewards.failures
            rollouts = [roll_out(model, items, tokenizer, rewards, num_generations=g.num_generations,
                                 max_completion_len=g.max_completion_len, temperature=g.temperature, top_k=g.top_k,
                                 top_p=g.top_p, scale_rewards=g.scale_rewards, generator=sampling)
                        for items in micro_batches]
            rollout_seconds = time.perf_counter() - started
            active = sum(int(r.mask.sum()) for r in rollouts)  # dapo's normaliser: the whole step's tokens
            old, ref = reference_log_probs(model, rollouts, g, device)
            updates = []
            for _ in range(g.num_iterations):  # optimizer steps on this batch
                updates.append(rollout_backward(model, rollouts, g, old, ref, device, accum=accum,
                                                active_tokens=active))
                grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
                lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=updates[-1].loss,
                                    grad_norm=grad_norm, last_saved=last_saved)
            progress.step += 1
            progress.batches_consumed += accum  # the data position resume continues from
            train_seconds = time.perf_counter() - started - rollout_seconds

            step = progress.step
            metrics = step_metrics(rollouts, updates, active, device)
            step_rewards.append(metrics["reward/mean"])
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                tokens = sum(r.num_tokens for r in rollouts)
                log.step({"step": step, "epoch": progress.epoch, **metrics,
                          "reward_failures": rewards.failures - failures_before, "lr": lr, "grad_norm": grad_norm,
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
        print(f"mean reward: {sum(step_rewards[:k]) / k:.3f} over the first {k} step(s) -> "
              f"{sum(step_rewards[-k:]) / k:.3f} over the last {k}")


if __name__ == "__main__":
    recipe_entry(main)
