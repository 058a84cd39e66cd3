"""LoRA fine-tuning of a Llama-family model on one device (cuda or cpu).

    tune run lora_finetune_single_device --config llama3_1/8B_lora_single_device
    tune run lora_finetune_single_device --config tiny/lora          # ~2 min on 2 CPU cores
    python lora_finetune_single_device.py --config my.yaml lora.rank=8 max_steps=100

Read top to bottom: settings, setup, the training loop, the final save. The base weights stay
frozen; only the LoRA A/B matrices (kept in fp32) train. The loss of one optimizer step is the
sum of the per-token cross-entropies over all its micro-batches divided by the number of label
tokens in the whole step, so gradient accumulation gives the same update as one big batch.
Checkpoints (PEFT adapter, merged HF folder, resume state) and metrics go to ``output_dir`` in
the layout of ``tunelab.run_layout``; ``resume=true`` continues from the newest complete
``step_N`` with exactly the losses an uninterrupted run would have had.

Setup, resume, logging and saving are the shared spine's (``tunelab.training.spine``), the
same calls ``lora_finetune_distributed`` makes. ``builtin:tiny`` (checkpoint) and
``builtin:tiny/<file>`` (packaged data) are resolved by ``tunelab.training.builtin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.packing import PackedDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.modules.peft import get_adapter_params
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.heldout import HeldOut
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
from tunelab.training.steps import (
    IGNORE_INDEX,
    RouterAuxLoss,
    clip_grad_norm,
    evaluate_loss,
    make_loader,
    micro_batch_backward,
    optimizer_step,
    optimizer_steps,
)



# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RecipeConfig(TrainConfig):
    """The shared keys (``TrainConfig``) and this recipe's own."""

    packing: bool
    cuda_graph: bool  # replay each micro-batch's forward + backward as a CUDA graph (CUDA; rows padded to max_seq_len)
    heldout_accuracy: int | None = None  # score this many validation rows (greedy exact match) before and after


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    with start_run(cfg, "lora_finetune_single_device", compile=cfg.compile,
                   offload_activations=cfg.offload_activations, cuda_graph=cfg.cuda_graph) as run:
        train(cfg, run)


def train(cfg: RecipeConfig, run) -> None:
    device = run.device
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)
    params = list(get_adapter_params(model).values())

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    train_data = PackedDataset(dataset, cfg.max_seq_len, pad_id=tokenizer.pad_id) if cfg.packing else dataset
    sampler = train_sampler(run, len(train_data))
    loader = make_loader(train_data, cfg.batch_size, sampler, tokenizer.pad_id, cfg.packing,
                         pad_to=cfg.max_seq_len if run.flags["cuda_graph"] else None)  # a graph needs fixed shapes
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(train_data), "packed rows" if cfg.packing else "samples")
    val_data = val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(run, cfg.validation, tokenizer, "validation")
        val_loader = make_loader(val_data, cfg.batch_size, eval_sampler(run, len(val_data)), tokenizer.pad_id,
                                 packed=False)

    optimizer, scheduler = build_optimizer(run, params, total_steps)
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)
    # held-out questions, answered before training (adapters off: the base model) and after it
    heldout = HeldOut(model, tokenizer, cfg.heldout_accuracy, val_data, dataset)

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)  # resumes: later rows dropped
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} samples each)")
    last_saved = run.resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    router_aux = RouterAuxLoss(model, cfg.router_aux_loss)  # MoE models: the load-balancing loss
    backward = micro_batch_backward(model, params, device, cuda_graph=run.flags["cuda_graph"], router_aux=router_aux)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            # normalise by the label tokens of the whole optimizer step, not per micro-batch
            n_labels = max(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches), 1)
            step_loss = torch.zeros((), device=device)
            for batch in micro_batches:
                step_loss += backward(batch, n_labels)  # forward + backward, gradients accumulate
            loss_value = step_loss.item() / n_labels
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
            lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=loss_value, grad_norm=grad_norm,
                                last_saved=last_saved, grads_in_place=run.flags["cuda_graph"])
            progress.step += 1
            progress.batches_consumed += accum  # the data position resume continues from
            throughput.step(sum(b["num_tokens"] for b in micro_batches))

            step = progress.step
            if step % cfg.log_every_n_steps == 0 or step in (1, total_steps):  # first + last always
                log.step({"step": step, "epoch": progress.epoch, "loss": loss_value, "lr": lr,
                          "tokens_per_s": throughput.rate(), "grad_norm": grad_norm, **router_aux.metrics()})
            if val_loader is not None and ((cfg.eval_every_n_steps and step % cfg.eval_every_n_steps == 0)
                                           or step == total_steps):
                eval_loss = evaluate_loss(model, val_loader, device)
                log.event({"step": step, "epoch": progress.epoch, "eval_loss": eval_loss},
                          f"step {step}: eval_loss={eval_loss:.4f}")
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
