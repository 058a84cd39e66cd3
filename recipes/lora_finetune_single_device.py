"""LoRA fine-tuning of a Llama-family model on one device (cuda or cpu).

    tune run lora_finetune_single_device --config llama3_1/8B_lora_single_device
    tune run lora_finetune_single_device --config tiny/lora          # ~20 s on 2 CPU cores
    python lora_finetune_single_device.py --config my.yaml lora.rank=8 max_steps=100

Read top to bottom: settings, helpers, setup, the training loop, the final save. The base
weights stay frozen; only the LoRA A/B matrices (kept in fp32) train. The loss of one optimizer
step is the sum of the per-token cross-entropies over all its micro-batches divided by the
number of label tokens in the whole step, so gradient accumulation gives the same update as
one big batch. Checkpoints (PEFT adapter, merged HF folder, resume state) and metrics go to
``output_dir`` in the layout of docs/architecture.md; ``resume=true`` continues from the
newest complete ``step_N`` with exactly the losses an uninterrupted run would have had.

``builtin:tiny`` (checkpoint) and ``builtin:tiny/<file>`` (packaged data) are resolved by
``tunelab.training.builtin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from tunelab.data.packing import PackedDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.generation import generate
from tunelab.modules.peft import get_adapter_params
from tunelab.training.checkpointing import ResumableSampler
from tunelab.training.config import component_field, instantiate, parse_recipe_args, recipe_entry, save_config
from tunelab.training.metrics import Throughput, peak_memory_gib
from tunelab.training.recipe_setup import (
    GGUFExportConfig,
    LoRAConfig,
    LRSchedulerConfig,
    build_dataset,
    check_settings,
    check_vocab,
    count_parameters,
    export_gguf_step,
    open_metrics,
    plan_steps,
    prepare_output_dir,
    resolve_paths,
    restore_progress,
    save_checkpoint,
    setup_model,
)
from tunelab.training.schedules import build_lr_scheduler
from tunelab.training.steps import (IGNORE_INDEX, apply_optimizer_step, loss_sum, make_loader, micro_batch_backward,
                                    optimizer_steps)
from tunelab.training.utils import cuda_only_settings_notice, resolve_device, resolve_dtype, seed_everything

SAMPLE_NEW_TOKENS = 32  # length of the greedy completion printed at the end


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig:
    """Every key is required in the YAML (the configs are the one source of defaults)."""

    checkpoint_dir: str  # HF folder (architecture from its config.json) or builtin:tiny
    output_dir: str
    tokenizer: str | None  # null = the tokenizer inside checkpoint_dir
    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
    seed: int
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    max_steps: int | None  # cap on optimizer steps
    max_seq_len: int
    packing: bool
    optimizer: dict = component_field(provided=("params",))
    lr_scheduler: LRSchedulerConfig
    lora: LoRAConfig
    quantize: Literal["nf4"] | None
    device: str  # auto | cpu | cuda | cuda:N
    dtype: Literal["bf16", "fp32"]
    activation_checkpointing: bool | int  # true: every layer; k: every k-th layer (selective); false: none
    offload_activations: bool  # layer inputs + attention in pinned CPU memory; attention not recomputed (CUDA)
    compile: bool
    cuda_graph: bool  # replay each micro-batch's forward + backward as a CUDA graph (CUDA; rows padded to max_seq_len)
    max_grad_norm: float | None  # null = no clipping (the norm is still logged)
    log_every_n_steps: int
    metric_loggers: list[dict]  # extra loggers beside metrics.jsonl (TensorBoard, W&B), [] = none
    save_every_n_steps: int | None  # plus always at the end
    save_merged: Literal["final", "always", "never"]
    export_gguf: GGUFExportConfig | None  # {dtype: f16|bf16|q8_0|q4_k_m}: a .gguf of the final model
    keep_last_n_checkpoints: int
    validation: dict | None = component_field(provided=("tokenizer", "max_seq_len"))
    eval_every_n_steps: int | None
    resume: bool


# ------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def evaluate(model, loader: DataLoader, device: torch.device) -> float:
    """Mean token loss over the whole loader (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        total += loss_sum(model, batch, device).item()
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def prompt_of(sample: dict) -> list[int]:
    """The prompt part of a sample: tokens up to the first trained target."""
    labels = sample["labels"]
    first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels) - 1)
    return list(sample["tokens"][: first + 1])


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_settings(cfg)
    manager, resume_dir = prepare_output_dir(cfg)
    out = manager.output_dir
    save_config(cfg, out / "config.yaml")  # as given (builtin: names kept), before resolving
    resolve_paths(cfg)

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    flags = cuda_only_settings_notice(device, compile=cfg.compile, offload_activations=cfg.offload_activations,
                                      cuda_graph=cfg.cuda_graph)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = setup_model(cfg, device, dtype, flags["compile"], flags["offload_activations"])
    check_vocab(tokenizer, model.args.vocab_size)
    params = list(get_adapter_params(model).values())
    n_params, n_trainable = count_parameters(model)
    print(f"model: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable "
          f"(LoRA rank {cfg.lora.rank}) on {device} in {cfg.dtype}")

    dataset = build_dataset(cfg.dataset, tokenizer, cfg.max_seq_len, "dataset")
    train_data = PackedDataset(dataset, cfg.max_seq_len, pad_id=tokenizer.pad_id) if cfg.packing else dataset
    sampler = ResumableSampler(len(train_data), seed=cfg.seed)
    loader = make_loader(train_data, cfg.batch_size, sampler, tokenizer.pad_id, cfg.packing,
                         pad_to=cfg.max_seq_len if flags["cuda_graph"] else None)  # a graph needs fixed shapes
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_data), "packed rows" if cfg.packing else "samples",
                                              cfg.batch_size, "batch_size x gradient_accumulation_steps")
    val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(cfg.validation, tokenizer, cfg.max_seq_len, "validation")
        val_loader = make_loader(val_data, cfg.batch_size, ResumableSampler(len(val_data), 0, shuffle=False),
                                 tokenizer.pad_id, packed=False)

    optimizer = instantiate(cfg.optimizer, params)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps,
                                   total_steps=total_steps, schedule=cfg.lr_scheduler.schedule)
    progress = restore_progress(cfg, resume_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                sampler=sampler)

    def checkpoint(final: bool) -> Path:
        return save_checkpoint(cfg, manager, progress, model=model, optimizer=optimizer, scheduler=scheduler,
                               final=final)

    # -------------------------------------------------------------------------------- loop
    metrics, display = open_metrics(cfg, out, progress.step, total_steps)  # resumes: later rows dropped
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} samples each)")
    last_saved = resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    backward = micro_batch_backward(model, params, device, cuda_graph=flags["cuda_graph"])
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            # normalise by the label tokens of the whole optimizer step, not per micro-batch
            n_labels = max(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches), 1)
            step_loss = torch.zeros((), device=device)
            for batch in micro_batches:
                step_loss += backward(batch, n_labels)  # forward + backward, gradients accumulate
            loss_value = step_loss.item() / n_labels
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf).item()
            # finite check, optimizer + lr schedule step, training position + 1 step
            lr = apply_optimizer_step(progress, optimizer, scheduler, accum=accum, loss=loss_value,
                                      grad_norm=grad_norm, last_saved=last_saved, grads_in_place=flags["cuda_graph"])
            throughput.step(sum(b["num_tokens"] for b in micro_batches))

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                row = {"step": step, "epoch": progress.epoch, "loss": loss_value,
                       "lr": lr, "tokens_per_s": throughput.rate(),
                       "grad_norm": grad_norm}
                if (mem := peak_memory_gib(device)) is not None:
                    row["peak_mem_gib"] = mem
                metrics.log(row)
                display.update(row)
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_row = {"step": step, "epoch": progress.epoch, "eval_loss": evaluate(model, val_loader, device)}
                metrics.log(eval_row)
                display.write(f"step {step}: eval_loss={eval_row['eval_loss']:.4f}")
                throughput.resume()
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step != total_steps:
                last_saved = checkpoint(final=False)
                throughput.resume()
    finally:
        display.close()
        metrics.close()

    # -------------------------------------------------------------------------------- final save
    final_dir = checkpoint(final=True) if last_saved is None or last_saved.name != f"step_{total_steps}" else last_saved
    print(f"adapter: {final_dir / 'adapter'}")
    if (final_dir / "merged").is_dir():
        print(f"merged model: {final_dir / 'merged'}")
    if (gguf := export_gguf_step(cfg, final_dir)) is not None:
        print(f"gguf: {gguf}")
    sample_source = val_data if val_loader is not None else dataset
    prompt = prompt_of(sample_source[0])
    completion = generate(model, prompt, max_new_tokens=SAMPLE_NEW_TOKENS, stop_tokens=tokenizer.stop_tokens)
    print(f"sample prompt: {tokenizer.decode(prompt)!r}")
    # a model vocab padded past the tokenizer's can emit ids the tokenizer cannot decode
    completion = [t for t in completion if t < tokenizer.vocab_size]
    print(f"sample completion (greedy): {tokenizer.decode(completion)!r}")


if __name__ == "__main__":
    recipe_entry(main)
