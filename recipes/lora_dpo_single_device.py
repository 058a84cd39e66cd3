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

Model setup, output folder, paths and checks are the LoRA recipe's (imported from
``lora_finetune_single_device``, so QLoRA via ``quantize: nf4`` works here exactly when it
works there); checkpoints, resume, RNG and data position go through ``tunelab.training``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from tunelab.data.preference import preference_collate
from tunelab.data.tokenizers import load_tokenizer
from tunelab.errors import ConfigError
from tunelab.modules.loss import preference_loss, sequence_log_probs_from_hidden
from tunelab.modules.peft import disable_adapters, get_adapter_params
from tunelab.training.checkpointing import ResumableSampler
from tunelab.training.config import component_field, instantiate, parse_recipe_args, recipe_entry, save_config
from tunelab.training.loggers import build_metric_loggers
from tunelab.training.metrics import MetricsLogger, ProgressDisplay, peak_memory_gib
from tunelab.training.recipe_setup import (
    LoRAConfig,
    LRSchedulerConfig,
    build_dataset,
    check_settings,
    plan_steps,
    prepare_output_dir,
    resolve_paths,
    restore_progress,
    save_checkpoint,
    setup_model,
)
from tunelab.training.schedules import build_lr_scheduler
from tunelab.training.steps import NonFiniteLossError, optimizer_steps
from tunelab.training.utils import cuda_only_settings_notice, resolve_device, resolve_dtype, seed_everything

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margins")


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class LossConfig:
    """``type``: sigmoid (DPO) | ipo | hinge | simpo (see ``tunelab.modules.loss.dpo``).
    ``label_smoothing`` is used by sigmoid and simpo, ``gamma`` (target margin) by simpo only."""

    type: Literal["sigmoid", "ipo", "hinge", "simpo"]
    beta: float
    label_smoothing: float
    gamma: float


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
    activation_checkpointing: bool
    compile: bool
    max_grad_norm: float | None  # null = no clipping (the norm is still logged)
    log_every_n_steps: int
    metric_loggers: list[dict]  # extra loggers beside metrics.jsonl (TensorBoard, W&B), [] = none
    save_every_n_steps: int | None  # plus always at the end
    save_merged: Literal["final", "always", "never"]
    keep_last_n_checkpoints: int
    validation: dict | None = component_field(provided=("tokenizer", "max_seq_len"))
    eval_every_n_steps: int | None
    resume: bool


# ------------------------------------------------------------------------------------ helpers
def check_loss_settings(cfg: RecipeConfig) -> None:
    """DPO-only value ranges (the shared ones are checked by the LoRA recipe's check_settings)."""
    loss = cfg.loss
    if not loss.beta > 0:
        raise ConfigError(f"loss.beta must be > 0, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.label_smoothing and loss.type in ("ipo", "hinge"):
        raise ConfigError(f"loss.label_smoothing is not used by loss.type={loss.type}; set it to 0.0")
    if loss.gamma and loss.type != "simpo":
        raise ConfigError("loss.gamma (target margin) is only used by loss.type=simpo; set it to 0.0")
    if cfg.precompute_ref_log_probs and loss.type == "simpo":
        raise ConfigError("precompute_ref_log_probs: simpo uses no reference model; set it to false")


def policy_log_probs(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [2b] (fp32) and response token counts [2b] of one micro-batch."""
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    hidden = model(tokens, return_hidden=True)  # (2b, s, dim)
    try:  # a plain (frozen) head lets the fused per-token loss skip the fp32 logits
        head = model.output_weight
    except ConfigError:  # LoRA on `output`: its logits need the module call
        head = None
    return sequence_log_probs_from_hidden(hidden, labels, model.logits_from_hidden, output_weight=head)


@torch.no_grad()
def reference_log_probs(model, batch: dict, device: torch.device) -> torch.Tensor:
    """[2b] log-probs under the base model: the same model with its adapters disabled."""
    with disable_adapters(model):
        return policy_log_probs(model, batch, device)[0]


class WithReference(Dataset):
    """A preference dataset whose items also carry their precomputed reference log-probs."""

    def __init__(self, dataset, ref: torch.Tensor):
        self.dataset, self.ref = dataset, ref  # ref: (n_pairs, 2) chosen, rejected

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        c, r = self.ref[i].tolist()
        return dict(self.dataset[i], ref_chosen_log_probs=c, ref_rejected_log_probs=r)


def make_loader(dataset, batch_size: int, sampler, pad_id: int, drop_last: bool = True) -> DataLoader:
    def collate(pairs):
        batch = preference_collate(pairs, pad_id)
        batch["num_tokens"] = sum(len(p["chosen_tokens"]) + len(p["rejected_tokens"]) for p in pairs)
        return batch

    # a private generator: iter(DataLoader) otherwise draws a seed from the global RNG
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(0))


def precompute_reference(model, dataset, batch_size: int, pad_id: int, device: torch.device) -> WithReference:
    """Reference log-probs of every pair, in dataset order, before training starts."""
    loader = make_loader(dataset, batch_size, ResumableSampler(len(dataset), 0, shuffle=False), pad_id,
                         drop_last=False)
    chosen, rejected = [], []
    for batch in loader:
        c, r = reference_log_probs(model, batch, device).cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    return WithReference(dataset, torch.stack([torch.cat(chosen), torch.cat(rejected)], dim=1))


def pair_losses(model, batch: dict, cfg: RecipeConfig, device: torch.device):
    """Per-pair losses [b] and (detached) rewards of one micro-batch, reference included."""
    ref = None
    if cfg.loss.type != "simpo":
        precomputed = batch.get("ref_log_probs")
        ref = precomputed.to(device) if precomputed is not None else reference_log_probs(model, batch, device)
    logps, n_tokens = policy_log_probs(model, batch, device)
    return preference_loss(cfg.loss.type, logps, ref, n_tokens, beta=cfg.loss.beta,
                           label_smoothing=cfg.loss.label_smoothing, gamma=cfg.loss.gamma)


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}rewards/chosen": chosen.mean().item(), f"{prefix}rewards/rejected": rejected.mean().item(),
            f"{prefix}rewards/accuracy": (chosen > rejected).float().mean().item(),
            f"{prefix}rewards/margins": (chosen - rejected).mean().item()}


@torch.no_grad()
def evaluate(model, loader: DataLoader, cfg: RecipeConfig, device: torch.device) -> dict[str, float]:
    """Mean loss and reward statistics over every validation pair (dropout off)."""
    model.eval()
    losses, chosen, rejected = [], [], []
    for batch in loader:
        out = pair_losses(model, batch, cfg, device)
        for acc, value in zip((losses, chosen, rejected), out):
            acc.append(value.float().cpu())
    model.train()
    stats = reward_stats(torch.cat(chosen), torch.cat(rejected), prefix="eval_")
    return {"eval_loss": torch.cat(losses).mean().item(), **stats}


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
    compile_layers = cuda_only_settings_notice(device, compile=cfg.compile)["compile"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = setup_model(cfg, device, dtype, compile_layers)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab is "
                          f"{model.args.vocab_size}; use the checkpoint's tokenizer (tokenizer=null)")
    params = list(get_adapter_params(model).values())
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable (LoRA rank {cfg.lora.rank}) on {device} "
          f"in {cfg.dtype}; loss {cfg.loss.type} (beta {cfg.loss.beta})")

    dataset = build_dataset(cfg.dataset, tokenizer, cfg.max_seq_len, "dataset")
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(cfg, len(dataset), "pairs", cfg.batch_size,
                                              "batch_size x gradient_accumulation_steps")
    val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(cfg.validation, tokenizer, cfg.max_seq_len, "validation")
        val_loader = make_loader(val_data, cfg.batch_size, ResumableSampler(len(val_data), 0, shuffle=False),
                                 tokenizer.pad_id, drop_last=False)
    if cfg.precompute_ref_log_probs:
        started = time.perf_counter()
        dataset = precompute_reference(model, dataset, cfg.batch_size, tokenizer.pad_id, device)
        print(f"reference log-probs of {len(dataset)} pairs precomputed in {time.perf_counter() - started:.1f}s")
    sampler = ResumableSampler(len(dataset), seed=cfg.seed)
    loader = make_loader(dataset, cfg.batch_size, sampler, tokenizer.pad_id)

    optimizer = instantiate(cfg.optimizer, params)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps,
                                   total_steps=total_steps, schedule=cfg.lr_scheduler.schedule)
    progress = restore_progress(cfg, resume_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                sampler=sampler)

    def checkpoint(final: bool) -> Path:
        return save_checkpoint(cfg, manager, progress, model=model, optimizer=optimizer, scheduler=scheduler,
                               final=final)

    # -------------------------------------------------------------------------------- loop
    metrics = MetricsLogger(out, extra_loggers=build_metric_loggers(cfg.metric_loggers))
    metrics.truncate_after(progress.step)  # rows a killed run logged after its last checkpoint
    display = ProgressDisplay(total_steps, initial=progress.step)
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} pairs each)")
    last_saved = resume_dir
    timer, tokens_seen = time.perf_counter(), 0
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            n_pairs = cfg.batch_size * accum  # the step loss is the mean over all its pairs
            step_loss = torch.zeros((), device=device)
            chosen, rejected = [], []
            for batch in micro_batches:
                losses, chosen_r, rejected_r = pair_losses(model, batch, cfg, device)
                (losses.sum() / n_pairs).backward()
                step_loss += losses.detach().sum()
                chosen.append(chosen_r)
                rejected.append(rejected_r)
            loss_value = step_loss.item() / n_pairs
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf).item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"loss {loss_value} / grad norm {grad_norm} at step {progress.step + 1} is not finite; "
                    f"stopped without saving ({kept}); lower optimizer.lr or loss.beta, set max_grad_norm or "
                    "use dtype=fp32")
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used (the scheduler moves it next)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batches_consumed += accum
            tokens_seen += sum(b["num_tokens"] for b in micro_batches)

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                elapsed = time.perf_counter() - timer
                row = {"step": step, "epoch": progress.epoch, "loss": loss_value,
                       **reward_stats(torch.cat(chosen), torch.cat(rejected)),
                       "lr": lr, "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "grad_norm": grad_norm}
                if (mem := peak_memory_gib(device)) is not None:
                    row["peak_mem_gib"] = mem
                metrics.log(row)
                display.update(row)
                timer, tokens_seen = time.perf_counter(), 0
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_row = {"step": step, "epoch": progress.epoch, **evaluate(model, val_loader, cfg, device)}
                metrics.log(eval_row)
                display.write(f"step {step}: eval_loss={eval_row['eval_loss']:.4f} "
                              f"eval_accuracy={eval_row['eval_rewards/accuracy']:.3f} "
                              f"eval_margin={eval_row['eval_rewards/margins']:.3f}")
                timer = time.perf_counter()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = checkpoint(final=False)
                timer = time.perf_counter()
    finally:
        display.close()
        metrics.close()

    # -------------------------------------------------------------------------------- final save
    done = last_saved is not None and last_saved.name == f"step_{total_steps}"  # resumed a finished run
    final_dir = last_saved if done else checkpoint(final=True)
    print(f"adapter: {final_dir / 'adapter'}")
    if (final_dir / "merged").is_dir():
        print(f"merged model: {final_dir / 'merged'}")


if __name__ == "__main__":
    recipe_entry(main)
