"""Setup pieces the LoRA recipes share (single device, DPO, distributed): the typed config
groups, value checks, the output-folder guard, path resolution, model and dataset setup.

Each takes the recipe's own typed config (any dataclass with the fields it reads), so a recipe
stays a readable top-to-bottom script while these live once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tunelab.errors import ConfigError, DataError
from tunelab.models import from_pretrained
from tunelab.models.checkpoint import check_checkpoint_dir
from tunelab.modules.peft import apply_lora, set_trainable_params
from tunelab.training.builtin import resolve_builtin
from tunelab.training.checkpointing import (
    CheckpointManager,
    TrainingProgress,
    adapter_writer,
    load_state,
    merged_writer,
    state_writer,
)
from tunelab.training.config import instantiate
from tunelab.training.loggers import build_metric_loggers, check_metric_loggers
from tunelab.training.metrics import MetricsLogger, ProgressDisplay
from tunelab.training.steps import checkpoint_every, wrap_layers

__all__ = [
    "LRSchedulerConfig",
    "GGUFExportConfig",
    "LoRAConfig",
    "check_settings",
    "prepare_output_dir",
    "resolve_paths",
    "setup_model",
    "build_dataset",
    "export_gguf_step",
    "plan_steps",
    "restore_progress",
    "save_checkpoint",
]


@dataclass(kw_only=True)
class LRSchedulerConfig:
    warmup_steps: int
    schedule: Literal["cosine", "linear", "constant"]


@dataclass(kw_only=True)
class GGUFExportConfig:
    """``export_gguf: {dtype: ...}``: write a GGUF file of the final model after training."""

    dtype: Literal["f16", "bf16", "q8_0", "q4_k_m"]


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float
    targets: list[str]


def check_settings(cfg) -> None:
    """Value ranges the types cannot express; one line per problem."""
    positive = dict(batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                    epochs=cfg.epochs, max_seq_len=cfg.max_seq_len, log_every_n_steps=cfg.log_every_n_steps,
                    keep_last_n_checkpoints=cfg.keep_last_n_checkpoints, max_steps=cfg.max_steps,
                    save_every_n_steps=cfg.save_every_n_steps, eval_every_n_steps=cfg.eval_every_n_steps)
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 (or null where allowed), got {value}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"max_grad_norm must be > 0 or null, got {cfg.max_grad_norm}")
    checkpoint_every(cfg.activation_checkpointing, cfg.offload_activations)
    if getattr(cfg, "cuda_graph", False) and cfg.lora.dropout > 0:
        raise ConfigError(f"cuda_graph: true replays a recorded step, so it cannot draw new dropout masks: "
                          f"set lora.dropout: 0 (it is {cfg.lora.dropout}) or cuda_graph: false")
    if cfg.export_gguf is not None and importlib.util.find_spec("gguf") is None:  # fail now, not after training
        raise ConfigError("export_gguf needs the gguf package: pip install 'tunelab[gguf]' (or set export_gguf: null)")
    check_metric_loggers(cfg.metric_loggers)


def prepare_output_dir(cfg) -> tuple[CheckpointManager, Path | None]:
    """Check output_dir is writable and never overwrite finished work; returns the manager and
    the step folder to resume from (None = start fresh)."""
    out = Path(cfg.output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); pick another output_dir") from None
    manager = CheckpointManager(out, cfg.keep_last_n_checkpoints)
    latest = manager.latest_complete()
    if latest is not None and not cfg.resume:
        raise ConfigError(f"output_dir {out} already holds checkpoints (newest {latest.name}); "
                          "pass resume=true to continue them or pick another output_dir")
    if cfg.resume and latest is None:
        print(f"notice: resume=true but {out} holds no complete checkpoint; starting from step 0")
    return manager, latest if cfg.resume else None


def resolve_paths(cfg) -> None:
    """Resolve ``builtin:`` names and check the checkpoint folder before any work starts."""
    cfg.checkpoint_dir = resolve_builtin(cfg.checkpoint_dir)
    if cfg.tokenizer is not None:
        cfg.tokenizer = resolve_builtin(cfg.tokenizer)
    for node in (cfg.dataset, cfg.validation):
        if node is not None and isinstance(node.get("source"), str):
            node["source"] = resolve_builtin(node["source"])
    check_checkpoint_dir(cfg.checkpoint_dir)


def setup_model(cfg, device: torch.device, dtype: torch.dtype, compile_layers: bool,
                offload_activations: bool = False):
    """Base model (frozen; NF4 decoder projections with quantize=nf4, i.e. QLoRA) + fp32 LoRA
    adapters, with the checkpointing / compile / activation-offload switches."""
    model = from_pretrained(cfg.checkpoint_dir, dtype=dtype, device=device, quantize=cfg.quantize)
    # QLoRA: the decoder projections are NF4Linear, which apply_lora turns into NF4LoRALinear
    apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, adapter_dtype=torch.float32)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=cfg.activation_checkpointing, compile_layers=compile_layers,
                offload_activations=offload_activations)
    return model.train()


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Every token id the tokenizer makes must have a row in the model's embedding.

    Raises:
        ConfigError: the tokenizer has more ids than the model's vocab.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab is "
                          f"{vocab_size}; use the checkpoint's tokenizer (tokenizer=null)")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(weights, trainable)`` of the model. An NF4 base counts its weights, not its storage
    (buffers on one device; frozen integer parameters under FSDP, not counted twice)."""
    from tunelab.modules.nf4 import NF4Weight

    nf4 = [w for w in model.modules() if isinstance(w, NF4Weight)]
    storage = {id(t) for w in nf4 for t in w.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in storage) + sum(w.numel() for w in nf4)
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def open_metrics(cfg, output_dir: Path, step: int, total_steps: int) -> tuple[MetricsLogger, ProgressDisplay]:
    """metrics.jsonl (+ the config's ``metric_loggers``) and the progress bar, resuming at
    ``step``: rows a killed run logged after that step are dropped."""
    metrics = MetricsLogger(output_dir, extra_loggers=build_metric_loggers(cfg.metric_loggers))
    metrics.truncate_after(step)
    return metrics, ProgressDisplay(total_steps, initial=step)


def build_dataset(node: dict, tokenizer, max_seq_len: int, what: str):
    dataset = instantiate(node, tokenizer=tokenizer, max_seq_len=max_seq_len)
    skipped = getattr(dataset, "num_skipped", 0)
    detail = f" (skipped {skipped}: {dataset.describe_skips()})" if skipped else ""
    print(f"{what}: {len(dataset)} samples{detail}")
    return dataset


def restore_progress(cfg, resume_dir: Path | None, *, model, optimizer, scheduler, sampler) -> TrainingProgress:
    """A fresh ``TrainingProgress``, or the one saved in ``resume_dir`` with the adapters,
    optimizer, scheduler, RNG and sampler seed restored.

    Raises:
        ConfigError: the checkpoint was written with another batch_size (its data position
            counts batches).
    """
    if resume_dir is None:
        return TrainingProgress(sampler_seed=cfg.seed, batch_size=cfg.batch_size)
    progress = load_state(resume_dir / "state", model=model, optimizer=optimizer, scheduler=scheduler)
    if progress.batch_size not in (None, cfg.batch_size):
        raise ConfigError(f"resume: {resume_dir.name} was written with batch_size={progress.batch_size}, "
                          f"not {cfg.batch_size}; resume with the same batch_size")
    sampler.seed = progress.sampler_seed
    print(f"resumed from {resume_dir} (step {progress.step}, epoch {progress.epoch})")
    return progress


def save_checkpoint(cfg, manager: CheckpointManager, progress: TrainingProgress, *, model, optimizer, scheduler,
                    final: bool) -> Path:
    """Write ``step_N``: the PEFT adapter, the merged HF folder when ``save_merged`` asks for it
    at this save, and the resume state (COMPLETE last, see ``CheckpointManager.save``)."""
    writers = {"adapter": adapter_writer(model, base_model_name_or_path=cfg.checkpoint_dir, lora_cfg=cfg.lora)}
    if cfg.save_merged == "always" or (final and cfg.save_merged == "final"):
        writers["merged"] = merged_writer(model, source_dir=cfg.checkpoint_dir, tokenizer_dir=cfg.tokenizer)
    writers["state"] = state_writer(progress, model=model, optimizer=optimizer, scheduler=scheduler)
    return manager.save(progress.step, writers)


def export_gguf_step(cfg, final_dir: Path) -> Path | None:
    """The ``export_gguf`` step after the final save: ``final_dir/model-<dtype>.gguf`` and its
    Ollama Modelfile, from the merged folder when that save wrote one, else from the base
    checkpoint + the adapter (merged in fp32 while exporting). None when the key is null; an
    existing file (a finished run resumed) is kept.
    """
    if cfg.export_gguf is None:
        return None
    from tunelab.models.gguf import export_gguf

    out = final_dir / f"model-{cfg.export_gguf.dtype}.gguf"
    if out.exists():
        print(f"notice: {out} exists; export_gguf kept it")
        return out
    merged = final_dir / "merged"
    source, adapter = (merged, None) if merged.is_dir() else (Path(cfg.checkpoint_dir), final_dir / "adapter")
    return export_gguf(source, out, dtype=cfg.export_gguf.dtype, adapter_dir=adapter, tokenizer_path=cfg.tokenizer)


def plan_steps(cfg, n_rows: int, rows: str, samples_per_batch: int, batch_desc: str) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for ``n_rows`` training rows.

    Args:
        cfg: the recipe config (gradient_accumulation_steps, epochs, max_steps).
        n_rows: rows the sampler draws from.
        rows: what a row is, for the message ("samples", "packed rows", "pairs").
        samples_per_batch: rows per micro-batch over all ranks (batch_size x world size).
        batch_desc: how that product is spelled in the message.

    Raises:
        DataError: fewer rows than one optimizer step needs.
    """
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = n_rows // samples_per_batch // accum
    if steps_per_epoch == 0:
        raise DataError(f"dataset has {n_rows} {rows}, fewer than {batch_desc} = {samples_per_batch * accum}; "
                        "lower them")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps
