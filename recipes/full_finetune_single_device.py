"""Full fine-tuning of a Llama-family model on one device (cuda or cpu): every weight trains.

    tune run full_finetune_single_device --config llama3_1/8B_full_single_device
    tune run full_finetune_single_device --config tiny/full          # CPU, about a minute

Read top to bottom: settings, setup, the training loop, the final save. The loss of one
optimizer step is the sum of the per-token cross-entropies over all its micro-batches divided
by the label tokens of the whole step, as in the LoRA recipe. Output: ``step_N/merged`` is the
trained model as a Hugging Face folder (config.json + sharded safetensors, loads in
transformers); ``step_N/state`` holds the weights and optimizer for ``resume=true``.

Memory. ``optimizer: {_component_: tunelab.training.optim.AdamWBF16}`` keeps AdamW's moments in
the weights' dtype (bf16 on GPU: 4 bytes per weight instead of 8) with stochastic rounding.
``optimizer_in_backward: true`` steps each weight as soon as its gradient is complete and frees
that gradient (``tunelab.training.optim.OptimizerInBackward``), so no full set of gradients is
ever held. What that changes, checked when the run starts:

* gradient accumulation: the gradients never add up over micro-batches, so
  ``gradient_accumulation_steps`` must be 1 (use the ordinary optimizer to accumulate);
* clipping: no global norm exists before the updates, so ``max_grad_norm`` must be null; the
  norm is still measured (each weight adds its share before its update) and logged;
* bad steps: a non-finite loss stops the run before backward; a non-finite gradient stops it
  before that weight's update (weights updated earlier in the same backward are not saved: the
  run ends without writing the step, the last complete checkpoint stays the newest).

Setup, resume, logging and saving are the shared spine's (``tunelab.training.spine``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.packing import PackedDataset
from tunelab.data.tokenizers import load_tokenizer
from tunelab.errors import ConfigError
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.heldout import HeldOut
from tunelab.training.metrics import Throughput
from tunelab.training.optim import NonFiniteGradientError, OptimizerInBackward
from tunelab.training.spine import (
    BaseTrainConfig,
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
    NonFiniteLossError,
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
class RecipeConfig(BaseTrainConfig):
    """The shared keys (``BaseTrainConfig``: no ``lora``) and this recipe's own."""

    packing: bool
    optimizer_in_backward: bool  # step each weight inside backward and free its gradient (see the docstring)
    heldout_accuracy: int | None = None  # score this many validation rows (greedy exact match) before and after


def check_in_backward(cfg) -> None:
    """``optimizer_in_backward``'s limits (module docstring).

    Raises:
        ConfigError: gradient accumulation or clipping asked for with it.
    """
    if not cfg.optimizer_in_backward:
        return
    if cfg.gradient_accumulation_steps != 1:
        raise ConfigError(f"optimizer_in_backward: true steps each weight in backward, so gradients cannot "
                          f"accumulate: set gradient_accumulation_steps: 1 (it is {cfg.gradient_accumulation_steps}) "
                          "or optimizer_in_backward: false")
    if cfg.max_grad_norm is not None:
        raise ConfigError("optimizer_in_backward: true updates each weight before the global gradient norm exists, "
                          "so it cannot clip: set max_grad_norm: null (the norm is still logged) or "
                          "optimizer_in_backward: false")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> None:
    cfg = parse_recipe_args(argv, RecipeConfig)
    check_in_backward(cfg)
    with start_run(cfg, "full_finetune_single_device", compile=cfg.compile,
                   offload_activations=cfg.offload_activations) as run:
        train(cfg, run)


def train(cfg: RecipeConfig, run) -> None:
    device = run.device
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint_dir)
    model = build_model(run, tokenizer)  # every weight trainable
    params = [p for p in model.parameters() if p.requires_grad]

    dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
    train_data = PackedDataset(dataset, cfg.max_seq_len, pad_id=tokenizer.pad_id) if cfg.packing else dataset
    sampler = train_sampler(run, len(train_data))
    loader = make_loader(train_data, cfg.batch_size, sampler, tokenizer.pad_id, cfg.packing)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(run, len(train_data), "packed rows" if cfg.packing else "samples")
    val_data = val_loader = None
    if cfg.validation is not None:
        val_data = build_dataset(run, cfg.validation, tokenizer, "validation")
        val_loader = make_loader(val_data, cfg.batch_size, eval_sampler(run, len(val_data)), tokenizer.pad_id,
                                 packed=False)

    # held-out questions, answered before training (scored now: the weights are about to change)
    heldout = HeldOut(model, tokenizer, cfg.heldout_accuracy, val_data, dataset)
    optimizer, scheduler = build_optimizer(run, params, total_steps)
    progress = restore_progress(run, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                                total_steps=total_steps)
    in_backward = OptimizerInBackward(optimizer, params) if cfg.optimizer_in_backward else None

    # -------------------------------------------------------------------------------- loop
    log = RunLog(run, progress.step, total_steps)  # resumes: later rows dropped
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch, {cfg.batch_size} x {accum} samples each)")
    last_saved = run.resume_dir
    throughput = Throughput()  # tokens/s of training steps (eval and saves excluded)
    router_aux = RouterAuxLoss(model, cfg.router_aux_loss)  # MoE models: the load-balancing loss
    backward = micro_batch_backward(model, params, device, router_aux=router_aux, check_loss=in_backward is not None)
    try:
        for micro_batches in optimizer_steps(progress, loader, sampler, accum=accum, samples_per_batch=cfg.batch_size,
                                             steps_per_epoch=steps_per_epoch, total_steps=total_steps):
            # normalise by the label tokens of the whole optimizer step, not per micro-batch
            n_labels = max(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches), 1)
            step_loss = torch.zeros((), device=device)
            for batch in micro_batches:
                step_loss += backward(batch, n_labels)  # forward + backward (in_backward: + the updates)
            loss_value = step_loss.item() / n_labels
            if in_backward is None:
                grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
                lr = optimizer_step(optimizer, scheduler, step=progress.step + 1, loss=loss_value,
                                    grad_norm=grad_norm, last_saved=last_saved)
            else:  # the weights were updated inside backward; the schedule moves on here
                grad_norm, lr = in_backward.grad_norm(), optimizer.param_groups[0]["lr"]
                scheduler.step()
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
    except NonFiniteGradientError as e:  # raised inside backward: some weights of this step are updated
        kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(f"step {progress.step + 1}: {e}; stopped without saving ({kept}); lower "
                                 "optimizer.lr or use dtype=fp32") from None
    finally:
        log.close()

    # -------------------------------------------------------------------------------- final save
    save_final(run, progress, model=model, optimizer=optimizer, scheduler=scheduler)
    heldout.report(model)


if __name__ == "__main__":
    recipe_entry(main)
