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
reward, ``completion_len/mean`` and ``/max``, ``clip_ratio/region``, ``kl`` (beta > 0),
``reward_failures``, rollout and training tokens/s. The run prints the mean reward of its first
and last steps (the first and last tenth of the run, up to 10 steps each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader

from tunelab.data.prompts import PromptDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.errors import ConfigError
from tunelab.modules.loss import token_log_probs_from_hidden
from tunelab.modules.loss.grpo import GRPO_LOSS_TYPES, clip_fractions, grpo_loss, grpo_per_token_loss
from tunelab.modules.peft import disable_adapters, get_adapter_params
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.grpo import Rollout, roll_out
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
from tunelab.training.steps import clip_grad_norm, optimizer_step, optimizer_steps, plain_output_weight


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class GRPOSettings:
    """The ``grpo:`` section (TRL's names)."""

    num_generations: int  # completions per prompt (the group); >= 2
    max_completion_len: int
    temperature: float
    top_k: int | None
    top_p: float | None
    epsilon: float  # ratio clip: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None  # null = epsilon
    beta: float  # KL to the reference (adapters off); 0 = none
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"]
    scale_rewards: Literal["group", "batch", "none"]
    num_iterations: int  # optimizer steps per rollout batch


@dataclass(kw_only=True)
class RecipeConfig(TrainConfig):
    """The shared keys (``TrainConfig``; ``batch_size`` counts prompts, ``max_seq_len`` bounds
    the prompt) and GRPO's: ``grpo`` and the ``rewards`` list."""

    grpo: GRPOSettings
    rewards: list[dict]


def check_grpo_settings(cfg: RecipeConfig) -> None:
    """GRPO's value ranges, one line each.

    Raises:
        ConfigError: naming the key and the fix.
    """
    g = cfg.grpo
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations must be >= 2 (a group of {g.num_generations} has nothing to "
                          "compare with)")
    for key, value in (("max_completion_len", g.max_completion_len), ("num_iterations", g.num_iterations)):
        if value < 1:
            raise ConfigError(f"grpo.{key} must be >= 1, got {value}")
    if not (g.epsilon > 0 and (g.epsilon_high is None or g.epsilon_high > 0)):
        raise ConfigError(f"grpo.epsilon and grpo.epsilon_high must be > 0, got {g.epsilon} / {g.epsilon_high}")
    if g.beta < 0 or g.temperature < 0:
        raise ConfigError(f"grpo.beta and grpo.temperature must be >= 0, got {g.beta} / {g.temperature}")
    if cfg.validation is not None:
        raise ConfigError("validation: the GRPO recipe does not score a validation set yet; set validation: null")
    if g.loss_type not in GRPO_LOSS_TYPES:  # the Literal type already refuses it; kept for direct callers
        raise ConfigError(f"grpo.loss_type must be one of {GRPO_LOSS_TYPES}")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_grpo_settings(cfg)
    rewards = build_rewards(cfg.rewards, cfg.allowed_components)  # before the model: a bad reward fails fast
    with start_run(cfg, "lora_grpo_single_device", compile=cfg.compile,
                   offload_activations=cfg.offload_activations) as run:
        train(cfg, run, rewards)


def policy_log_probs(model, rollout: Rollout, device: torch.device) -> torch.Tensor:
    """[B, s] log-probs of the sampled tokens under ``model`` (0 off the completions)."""
    hidden = model(rollout.tokens.to(device), return_hidden=True)
    return token_log_probs_from_hidden(hidden, rollout.labels.to(device), model.logits_from_hidden,
                                       output_weight=plain_output_weight(model))


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
            with torch.no_grad():  # the sampling policy's log-probs (needed apart only when reused)
                old = [policy_log_probs(model, r, device) for r in rollouts] if g.num_iterations > 1 else None
                with disable_adapters(model):
                    ref = [policy_log_probs(model, r, device) for r in rollouts] if g.beta else None
            clipped, kl_sum, loss_sum = torch.zeros(3, dtype=torch.float64), 0.0, 0.0
            for _ in range(g.num_iterations):
                iteration_loss = 0.0
                for i, r in enumerate(rollouts):
                    logps = policy_log_probs(model, r, device)
                    mask, adv = r.mask.to(device), r.advantages.to(device)
                    per_token, ratio, kl = grpo_per_token_loss(
                        logps, logps.detach() if old is None else old[i], adv, epsilon=g.epsilon,
                        epsilon_high=g.epsilon_high, ref_logps=None if ref is None else ref[i], beta=g.beta)
                    loss = grpo_loss(per_token, mask, g.loss_type, max_completion_len=g.max_completion_len,
                                     num_active_tokens=active)
                    loss = loss if g.loss_type == "dapo" else loss / accum  # the step is the sum of these
                    loss.backward()
                    iteration_loss += float(loss.detach())
                    clipped += clip_fractions(ratio, adv, mask, epsilon=g.epsilon, epsilon_high=g.epsilon_high).cpu()
                    if kl is not None:
                        kl_sum += float((kl.detach() * mask).sum())
                grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
                lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=iteration_loss,
                                    grad_norm=grad_norm, last_saved=last_saved)
                loss_sum += iteration_loss
            progress.step += 1
            progress.batches_consumed += accum  # the data position resume continues from
            train_seconds = time.perf_counter() - started - rollout_seconds

            step = progress.step
            reward = torch.cat([r.rewards for r in rollouts])
            step_rewards.append(float(reward.mean()))
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                lengths = torch.cat([r.completion_lengths for r in rollouts]).float()
                tokens = sum(r.num_tokens for r in rollouts)
                per_reward = {f"reward/{name}": float(torch.cat([r.per_reward[name] for r in rollouts]).mean())
                              for name in rollouts[0].per_reward}
                row = {"step": step, "epoch": progress.epoch, "loss": loss_sum / g.num_iterations, "reward/mean": step_rewards[-1],
                       "reward/std": float(reward.std()) if reward.numel() > 1 else 0.0, **per_reward,
                       "completion_len/mean": float(lengths.mean()), "completion_len/max": float(lengths.max()),
                       "clip_ratio/region": float(clipped[2]) / max(active * g.num_iterations, 1),
                       "reward_failures": rewards.failures - failures_before, "lr": lr, "grad_norm": grad_norm,
                       "rollout_tokens_per_s": tokens / max(rollout_seconds, 1e-9),
                       "tokens_per_s": tokens * g.num_iterations / max(train_seconds, 1e-9)}
                if g.beta:
                    row["kl"] = kl_sum / max(active * g.num_iterations, 1)
                log.step(row)
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
