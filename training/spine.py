"""The spine every training recipe shares: the config keys, the setup, resume, logging and
saving, written once and valid on one device and on N FSDP ranks alike.

A recipe file reads top to bottom (settings, setup, loop, save) and calls these pieces. The
parts that exist only when distributed (joining the process group, ``fully_shard``, sharded
load and save, rank-0-only output, the metric all-reduce) live inside them and do nothing on
one device, so a single-device and a distributed recipe of one method differ only in what
distribution changes in the step itself: gradient sync, the loss scale, per-rank dropout seeds.

    with start_run(cfg, "lora_finetune_single_device", compile=cfg.compile) as run:
        model = build_model(run, tokenizer)                 # from_pretrained or meta + fully_shard
        dataset = build_dataset(run, cfg.dataset, tokenizer, "dataset")
        sampler = train_sampler(run, len(dataset))          # every N-th sample per rank
        progress = restore_progress(run, model=..., optimizer=..., scheduler=..., sampler=...)
        log = RunLog(run, progress.step, total_steps)       # metrics.jsonl + progress bar (rank 0)
        ... the recipe's loop ...
        save_checkpoint(run, progress, model=..., optimizer=..., scheduler=..., final=True)

Every function takes the recipe's own typed config (through ``run.cfg``): a subclass of
:class:`TrainConfig`, plus :class:`DistributedConfig` for the FSDP recipes.
"""

from __future__ import annotations

import importlib.util
import math
import re
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tunelab.errors import CheckpointError, ConfigError, DataError, RunFinished
from tunelab.models import from_pretrained
from tunelab.models.checkpoint import check_checkpoint_dir, read_hf_config
from tunelab.models.hf_config import args_from_hf_config
from tunelab.models.mxfp4 import is_mxfp4
from tunelab.modules.peft import apply_lora, check_lora_args, set_trainable_params
from tunelab.run_layout import COMPLETE, MERGED, release_lock, step_dir, take_lock
from tunelab.training.builtin import resolve_builtin
from tunelab.training.checkpointing import (
    CheckpointManager,
    RankSampler,
    TrainingProgress,
    adapter_writer,
    apply_resume_changes,
    load_state,
    merged_writer,
    resume_changes,
    state_writer,
)
from tunelab.training.config import component_field, instantiate, save_config
from tunelab.training.export import export_gguf_step
from tunelab.training.heldout import check_heldout
from tunelab.training.loggers import check_metric_loggers
from tunelab.training.metrics import RunLog
from tunelab.training.process_group import (
    all_reduce_sum,
    barrier,
    broadcast_from_rank0,
    destroy_distributed,
    init_distributed,
    is_rank0,
    name_failing_rank,
    rank,
    say,
    world_size,
)
from tunelab.training.schedules import build_lr_scheduler
from tunelab.training.sharded_io import (
    gather_full_state,
    gathered_optimizer_state,
    init_dora_sharded,
    init_lora_sharded,
    load_hf_weights_sharded,
    load_sharded_state,
)
from tunelab.training.sharding import FSDPConfig, build_meta_model, check_prefetch_layers, local_tensor, shard_model
from tunelab.training.steps import NonFiniteLossError, check_mlp_tile_tokens, checkpoint_every, wrap_layers
from tunelab.training.utils import cuda_only_settings_notice, resolve_device, resolve_dtype, seed_everything

__all__ = [
    "DistributedConfig",
    "GGUFExportConfig",
    "LRSchedulerConfig",
    "LoRAConfig",
    "Run",
    "RunLog",
    "TrainConfig",
    "BaseTrainConfig",
    "lora_settings",
    "build_dataset",
    "build_model",
    "build_optimizer",
    "build_sharded_model",
    "check_settings",
    "count_parameters",
    "eval_sampler",
    "save_final",
    "plan_steps",
    "restore_progress",
    "save_checkpoint",
    "start_run",
    "train_sampler",
]


# ------------------------------------------------------------------------------------ config
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
    # DoRA: a trained magnitude per output row of each adapted layer (modules.peft.LoRALinear).
    # A key a config may leave out
    use_dora: bool = False


@dataclass(kw_only=True)
class BaseTrainConfig:
    """The keys every training recipe has (full fine-tuning's config is this plus its own);
    :class:`TrainConfig` adds ``lora`` for the LoRA recipes. Every key is required in the YAML
    (the configs are the one source of defaults) unless it says otherwise.
    ``batch_size`` is per rank: global = batch_size x gradient_accumulation_steps x world size."""

    checkpoint_dir: str  # HF folder (architecture from its config.json) or builtin:tiny
    output_dir: str  # distributed: on a filesystem every node sees (multi-node resume)
    tokenizer: str | None  # null = the tokenizer inside checkpoint_dir
    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
    seed: int
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    max_steps: int | None  # cap on optimizer steps
    max_seq_len: int
    optimizer: dict = component_field(provided=("params",))
    lr_scheduler: LRSchedulerConfig
    quantize: Literal["nf4"] | None
    device: str  # auto | cpu | cuda | cuda:N (distributed: auto | cpu | cuda, each rank cuda:LOCAL_RANK)
    dtype: Literal["bf16", "fp32"]
    activation_checkpointing: bool | int  # true: every layer; k: every k-th layer (selective); false: none
    # true: layer inputs + attention in pinned CPU memory, attention not recomputed; inputs: the
    # layer inputs only (long context); false: none (CUDA only)
    offload_activations: bool | Literal["inputs"]
    compile: bool
    max_grad_norm: float | None  # null = no clipping (the norm is still logged)
    log_every_n_steps: int
    metric_loggers: list[dict]  # extra loggers beside metrics.jsonl (TensorBoard, W&B), [] = none
    save_every_n_steps: int | None  # plus always at the end
    save_merged: Literal["final", "always", "never"]  # distributed: the merged export holds the model on rank 0
    export_gguf: GGUFExportConfig | None  # {dtype: f16|bf16|q8_0|q4_k_m}: a .gguf of the final model
    keep_last_n_checkpoints: int
    validation: dict | None = component_field(provided=("tokenizer", "max_seq_len"))
    eval_every_n_steps: int | None
    resume: bool
    # callables a _component_ may name beyond tunelab.*, torch.optim.* and torch.nn.* (dotted
    # names, or module.* for a whole module); a key a config may leave out: none by default
    allowed_components: list[str] = field(default_factory=list)
    # mixture-of-experts models: add the load-balancing loss in training (coefficient: config.json's
    # router_aux_loss_coef) and log it; no effect on dense models, so a config may leave it out
    router_aux_loss: bool = True
    # tokens per tile of the sequence-tiled MLP (each dense layer's norm + MLP + residual add run a
    # tile at a time in forward and backward, so the MLP's wide intermediates exist for one tile:
    # long context); null = the whole sequence at once. A key a config may leave out
    mlp_tile_tokens: int | None = None
    # cap on the pinned host memory offload_activations uses per forward, in GiB; the layers past
    # it keep their inputs on the GPU. null = no cap. A key a config may leave out
    offload_host_gib: float | None = None


@dataclass(kw_only=True)
class TrainConfig(BaseTrainConfig):
    """The keys every LoRA recipe has: the shared ones and ``lora``; a recipe's ``RecipeConfig``
    extends it with its own."""

    lora: LoRAConfig


def lora_settings(cfg) -> LoRAConfig | None:
    """The run's LoRA settings (any config with a ``lora`` group), None for full fine-tuning
    (every weight trains)."""
    return getattr(cfg, "lora", None)


@dataclass(kw_only=True)
class DistributedConfig:
    """The keys only the FSDP recipes have (mixed into their ``RecipeConfig``)."""

    fsdp: FSDPConfig
    dist_timeout_s: int  # a collective waiting longer than this fails the job instead of hanging


def check_settings(cfg) -> None:
    """Value ranges the types cannot express; one line per problem.

    Raises:
        ConfigError: the first key out of range, with the fix.
    """
    positive = dict(batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                    epochs=cfg.epochs, max_seq_len=cfg.max_seq_len, log_every_n_steps=cfg.log_every_n_steps,
                    keep_last_n_checkpoints=cfg.keep_last_n_checkpoints, max_steps=cfg.max_steps,
                    save_every_n_steps=cfg.save_every_n_steps, eval_every_n_steps=cfg.eval_every_n_steps)
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 (or null where allowed), got {value}")
    if cfg.offload_host_gib is not None and not cfg.offload_host_gib > 0:
        raise ConfigError(f"offload_host_gib must be > 0 or null (no cap), got {cfg.offload_host_gib}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"max_grad_norm must be > 0 or null, got {cfg.max_grad_norm}")
    for key, value in cfg.optimizer.items():  # torch takes lr=inf and then trains nan
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"optimizer.{key} = {value} is not a finite number")
    lora = lora_settings(cfg)
    if lora is not None:
        check_lora_args(lora.rank, lora.alpha, lora.dropout)
        if not lora.targets:
            raise ConfigError("lora.targets is empty; name at least one layer, e.g. [q_proj, v_proj]")
    elif cfg.quantize is not None:
        raise ConfigError(f"quantize: {cfg.quantize} freezes the weights in 4 bits, but full fine-tuning trains "
                          "them; set quantize: null (or use the LoRA recipe for QLoRA)")
    if cfg.lr_scheduler.warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.warmup_steps must be >= 0, got {cfg.lr_scheduler.warmup_steps}")
    if not isinstance(cfg, DistributedConfig) and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device: {cfg.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if isinstance(cfg, DistributedConfig) and cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not supported here; use auto, cpu or cuda (torchrun gives "
                          "each rank cuda:LOCAL_RANK)")
    checkpoint_every(cfg.activation_checkpointing, cfg.offload_activations)
    check_mlp_tile_tokens(cfg.mlp_tile_tokens)
    check_heldout(getattr(cfg, "heldout_accuracy", None))
    if getattr(cfg, "cuda_graph", False) and lora is not None and lora.dropout > 0:
        raise ConfigError(f"cuda_graph: true replays a recorded step, so it cannot draw new dropout masks: "
                          f"set lora.dropout: 0 (it is {lora.dropout}) or cuda_graph: false")
    if cfg.export_gguf is not None and importlib.util.find_spec("gguf") is None:  # fail now, not after training
        raise ConfigError("export_gguf needs the gguf package: pip install 'tunelab[gguf]' (or set export_gguf: null)")
    check_metric_loggers(cfg.metric_loggers, cfg.allowed_components)
    if isinstance(cfg, DistributedConfig):
        if cfg.dist_timeout_s < 1:
            raise ConfigError(f"dist_timeout_s must be >= 1, got {cfg.dist_timeout_s}")
        check_prefetch_layers(cfg.fsdp.prefetch_layers)


# ------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """One training run as the recipe's pieces see it.

    Args:
        cfg: the recipe's config (paths resolved).
        device: this rank's device.
        dtype: the base weights' dtype.
        flags: the CUDA-only switches in effect (False on cpu), by config key.
        manager: the output folder's checkpoint manager.
        resume_dir: the step folder to resume from, None to start fresh.
        distributed: an FSDP run (``fully_shard``, sharded save and load), on any world size.
        changes: on resume, the settings that differ from the run that wrote the checkpoints
            (dotted key -> (then, now)); :func:`restore_progress` applies them.
    """

    cfg: Any
    device: torch.device
    dtype: torch.dtype
    flags: dict[str, bool | str]
    manager: CheckpointManager
    resume_dir: Path | None
    distributed: bool
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # resumed: key -> (then, now)

    @property
    def output_dir(self) -> Path:
        return self.manager.output_dir

    @property
    def rank(self) -> int:
        return rank()

    @property
    def world(self) -> int:
        return world_size()

    @property
    def global_batch(self) -> int:
        """Samples of one micro-batch over all ranks (the unit of the data position)."""
        return self.cfg.batch_size * self.world


@contextmanager
def start_run(cfg, recipe: str, *, distributed: bool = False, **cuda_only: bool) -> Iterator[Run]:
    """Everything before the model: check the config, join the process group (``distributed``:
    torchrun's, ``cfg.device`` / ``cfg.dist_timeout_s``), decide the output folder (rank 0,
    which writes config.yaml as given), resolve ``builtin:`` paths, seed, pick device and dtype,
    switch the CUDA-only settings off on cpu (one notice). Rank 0 holds output_dir's lock
    (``tunelab.run_layout.take_lock``) until the block is left. On leaving, a distributed run
    prints which rank failed (if one did) and leaves the process group in order. A
    ``RunFinished`` raised in the block (resuming a finished run) ends it quietly.

    Args:
        cfg: the recipe config.
        recipe: its name, for the torchrun launch hint.
        distributed: an FSDP recipe (must be launched by torchrun).
        **cuda_only: config key -> requested, for the settings that need CUDA.
    """
    check_settings(cfg)
    device = init_distributed(cfg.device, cfg.dist_timeout_s, recipe=recipe) if distributed else None
    try:
        with name_failing_rank():
            try:
                yield _setup(cfg, device, cuda_only)
            except RunFinished:
                pass  # resume=true on a finished run: restore_progress said so and named its outputs
            finally:
                if is_rank0():
                    release_lock(Path(cfg.output_dir).expanduser())
    finally:
        if distributed:
            destroy_distributed()


def _setup(cfg, device: torch.device | None, cuda_only: dict[str, bool]) -> Run:
    distributed = device is not None
    manager, resume_dir, changes = _prepare_output_dir(cfg)
    _resolve_paths(cfg)
    seed_everything(cfg.seed)
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # every rank decides alike (pinned memory checked on each); rank 0 says what was switched off
    flags = cuda_only_settings_notice(device, announce=is_rank0(), **cuda_only)
    if "cpu_offload" in flags:  # FSDP's parameter offload: the fsdp section is what shard_model reads
        cfg.fsdp.cpu_offload = flags["cpu_offload"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return Run(cfg, device, dtype, flags, manager, resume_dir, distributed, changes)


def _prepare_output_dir(cfg) -> tuple[CheckpointManager, Path | None, dict[str, tuple[Any, Any]]]:
    """Rank 0 checks output_dir is writable, never overwrites finished work, compares a resumed
    run's settings with the ones that wrote its checkpoints (``resume_changes``) and writes
    config.yaml (as given, before ``builtin:`` names are resolved); every rank gets its answer:
    the manager, the step folder to resume from (None = start fresh) and the changed settings.

    Raises:
        ConfigError: output_dir unusable or holding checkpoints without resume=true, a setting
            that cannot change on resume, or a rank that cannot see the folder rank 0 resumes
            from.
    """
    out = Path(cfg.output_dir).expanduser()
    resume_name, changes = None, {}
    if is_rank0():
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); pick another output_dir") from None
        take_lock(out)  # one run per folder, until start_run's exit
        manager = CheckpointManager(out, cfg.keep_last_n_checkpoints)
        latest = manager.latest_complete()
        if latest is not None and not cfg.resume:
            raise ConfigError(f"output_dir {out} already holds checkpoints (newest {latest.name}); "
                              "pass resume=true to continue them or pick another output_dir")
        if cfg.resume and latest is None:
            print(f"notice: resume=true but {out} holds no complete checkpoint; starting from step 0")
        if cfg.resume and latest is not None:
            intact, damaged = manager.latest_intact()  # files and sizes as the save recorded them
            for line in damaged:
                print(f"warning: {line}; passed over for an older checkpoint", flush=True)
            if intact is None:
                raise ConfigError(f"resume: no intact checkpoint in {out} ({damaged[0]}); "
                                  "pick another output_dir or resume=false into a new one")
            resume_name = intact.name
            changes = resume_changes(out / "config.yaml", cfg)
        save_config(cfg, out / "config.yaml")  # what runs now
    resume_name, changes = broadcast_from_rank0((resume_name, changes))  # rank 0 decides; the others follow
    manager = CheckpointManager(out, cfg.keep_last_n_checkpoints)
    resume_dir = out / resume_name if resume_name is not None else None
    if resume_dir is not None and not (resume_dir / COMPLETE).is_file():
        raise ConfigError(f"rank {rank()} cannot see {resume_dir}, which rank 0 resumes from; put output_dir "
                          "on a filesystem every node shares")
    return manager, resume_dir, changes


def _resolve_paths(cfg) -> None:
    """Resolve ``builtin:`` names and check the checkpoint folder before any work starts."""
    cfg.checkpoint_dir = resolve_builtin(cfg.checkpoint_dir)
    if cfg.tokenizer is not None:
        cfg.tokenizer = resolve_builtin(cfg.tokenizer)
    for node in (cfg.dataset, cfg.validation):
        if node is not None and isinstance(node.get("source"), str):
            node["source"] = resolve_builtin(node["source"])
    check_checkpoint_dir(cfg.checkpoint_dir)


# ------------------------------------------------------------------------------------ model
def build_model(run: Run, tokenizer) -> nn.Module:
    """The frozen base (NF4 decoder projections with ``quantize: nf4``, i.e. QLoRA) with fp32
    LoRA adapters, only the adapters trainable, the layers wrapped for activation checkpointing,
    compile and activation offload; FSDP-sharded on a distributed run. Prints its size.

    Raises:
        ConfigError: a tokenizer with more ids than the model's vocab, or (distributed) a
            pre-quantized checkpoint.
    """
    cfg, lora = run.cfg, lora_settings(run.cfg)
    compile_layers, offload = run.flags.get("compile", False), run.flags.get("offload_activations", False)
    if run.distributed:
        hf_config = read_hf_config(cfg.checkpoint_dir)
        if "quantization_config" in hf_config and not is_mxfp4(hf_config):  # MXFP4: dequantized as read
            raise ConfigError(f"{cfg.checkpoint_dir} is pre-quantized, which the FSDP recipes do not load; "
                              "use the dense checkpoint (with quantize=nf4 for QLoRA)")
        args = args_from_hf_config(hf_config)
        check_vocab(tokenizer, args.vocab_size)
        model = build_sharded_model(cfg, args, run.device, run.dtype, compile_layers, offload)
    else:
        model = from_pretrained(cfg.checkpoint_dir, dtype=run.dtype, device=run.device, quantize=cfg.quantize)
        if lora is not None:  # QLoRA: the decoder projections are NF4Linear, which become NF4LoRALinear
            apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, adapter_dtype=torch.float32,
                       use_dora=lora.use_dora)
            set_trainable_params(model)
        else:  # full fine-tuning: every weight trains (the non-persistent RoPE tables are buffers)
            model.requires_grad_(True)
        wrap_layers(model, activation_checkpointing=cfg.activation_checkpointing, compile_layers=compile_layers,
                    offload_activations=offload, offload_host_gib=cfg.offload_host_gib,
                    mlp_tile_tokens=cfg.mlp_tile_tokens)
        check_vocab(tokenizer, model.args.vocab_size)
    n_params, n_trainable = count_parameters(model)
    where = f", FSDP over {run.world} rank(s) on {run.device.type}" if run.distributed else f" on {run.device}"
    method = "full fine-tuning" if lora is None else f"{'DoRA' if lora.use_dora else 'LoRA'} rank {lora.rank}"
    say(f"model: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable ({method}){where} "
        f"in {cfg.dtype}")
    if run.distributed:
        mib = [sum(t.numel() * t.element_size() for t in ts) / 2**20
               for ts in ([local_tensor(p) for p in model.parameters()], list(model.parameters()))]
        held = "sharded storage" if cfg.fsdp.shard_frozen else "the frozen base whole on every rank"
        say(f"parameters held by rank 0: {mib[0]:.2f} MiB of {mib[1]:.2f} MiB ({held})")
    return model.train()


def build_sharded_model(cfg, args, device: torch.device, dtype: torch.dtype, compile_layers: bool,
                        offload_activations: bool | str = False) -> nn.Module:
    """Meta build (NF4 decoder projections with quantize=nf4) -> LoRA -> fully_shard per layer
    and root -> allocate the shards -> base weights read shard by shard -> LoRA initialised as
    on one device (call at the same point of the seeded RNG stream on every rank).

    Args:
        cfg: the recipe config (lora, quantize, activation_checkpointing, mlp_tile_tokens, fsdp,
            checkpoint_dir).
        args: the model's ``ModelArgs``.
        device: this rank's device.
        dtype: base weight dtype (bf16 also turns on bf16 mixed precision).
        compile_layers: compile each decoder layer.
        offload_activations: keep the checkpointed layer inputs (and attention, unless
            ``"inputs"``) in pinned CPU memory (``wrap_layers``).
    """
    model = build_meta_model(args, dtype, lora_settings(cfg), cfg.quantize)
    wrap_layers(model, activation_checkpointing=cfg.activation_checkpointing, compile_layers=compile_layers,
                offload_activations=offload_activations, offload_host_gib=cfg.offload_host_gib,
                mlp_tile_tokens=cfg.mlp_tile_tokens)
    shard_model(model, param_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None,
                reshard_after_forward=cfg.fsdp.reshard_after_forward, cpu_offload=cfg.fsdp.cpu_offload,
                prefetch_layers=cfg.fsdp.prefetch_layers, shard_frozen=cfg.fsdp.shard_frozen)
    model.to_empty(device="cpu" if cfg.fsdp.cpu_offload else device)
    load_hf_weights_sharded(model, cfg.checkpoint_dir)
    init_lora_sharded(model)
    init_dora_sharded(model)
    model.reset_rope(device)
    return model.train()


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Every token id the tokenizer makes must have a row in the model's embedding.

    Raises:
        ConfigError: the tokenizer has more ids than the model's vocab.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab is "
                          f"{vocab_size}; use the checkpoint's tokenizer (tokenizer=null)")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(weights, trainable)`` of the model. An NF4 base counts its weights, not its storage
    (buffers on one device; frozen integer parameters under FSDP, not counted twice)."""
    from tunelab.modules.nf4 import NF4Weight

    nf4 = [w for w in model.modules() if isinstance(w, NF4Weight)]
    storage = {id(t) for w in nf4 for t in w.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in storage) + sum(w.numel() for w in nf4)
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ data
def build_dataset(run: Run, node: dict, tokenizer, what: str):
    """The ``dataset`` / ``validation`` component, built on every rank (the same rows
    everywhere); rank 0 reports its size and the rows it skipped."""
    dataset = instantiate(node, tokenizer=tokenizer, max_seq_len=run.cfg.max_seq_len,
                          allowed_components=run.cfg.allowed_components)
    skipped = getattr(dataset, "num_skipped", 0)
    detail = f" (skipped {skipped}: {dataset.describe_skips()})" if skipped else ""
    say(f"{what}: {len(dataset)} samples{detail}")
    return dataset


def train_sampler(run: Run, num_samples: int) -> RankSampler:
    """The seeded, resumable training order; rank r of N takes every N-th sample of it (on one
    device: all of it)."""
    return RankSampler(num_samples, seed=run.cfg.seed, rank=run.rank, world_size=run.world)


def eval_sampler(run: Run, num_samples: int) -> RankSampler:
    """Validation rows in order, split over the ranks. Only the largest multiple of the world
    size is used (up to world - 1 rows left out) so every rank runs equally many batches, as
    FSDP's collectives need.

    Raises:
        DataError: fewer validation rows than ranks (nothing would be evaluated).
    """
    world = run.world
    if num_samples < world:
        raise DataError(f"validation has {num_samples} rows, fewer than the {world} ranks that share it; "
                        "use a larger validation set or validation=null")
    return RankSampler(num_samples // world * world, 0, run.rank, world, shuffle=False)


def build_optimizer(run: Run, params: list[torch.Tensor], total_steps: int):
    """``(optimizer, lr scheduler)``: the config's ``optimizer`` component over ``params`` and
    its ``lr_scheduler`` (warmup, then the schedule) over ``total_steps``."""
    cfg = run.cfg
    optimizer = instantiate(cfg.optimizer, params, allowed_components=cfg.allowed_components)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps, total_steps=total_steps,
                                   schedule=cfg.lr_scheduler.schedule)
    return optimizer, scheduler


def plan_steps(run: Run, n_rows: int, rows: str) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for ``n_rows`` training rows.

    Args:
        run: the run (batch_size, gradient_accumulation_steps, epochs, max_steps; world size).
        n_rows: rows the sampler draws from.
        rows: what a row is, for the message ("samples", "packed rows", "pairs").

    Raises:
        DataError: fewer rows than one optimizer step needs.
    """
    cfg, accum = run.cfg, run.cfg.gradient_accumulation_steps
    steps_per_epoch = n_rows // run.global_batch // accum
    if steps_per_epoch == 0:
        spelled = "batch_size x gradient_accumulation_steps" + (" x world size" if run.distributed else "")
        raise DataError(f"dataset has {n_rows} {rows}, fewer than {spelled} = {run.global_batch * accum}; "
                        "lower them")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        if cfg.max_steps > total_steps and is_rank0():  # the epochs end first: say so instead of silently training less
            print(f"max_steps {cfg.max_steps} is more than epochs {cfg.epochs} x {steps_per_epoch} steps per epoch "
                  f"allow: training {total_steps} steps (raise epochs to train longer)")
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


# ------------------------------------------------------------------------------------ state
def restore_progress(run: Run, *, model, optimizer, scheduler, sampler, total_steps: int) -> TrainingProgress:
    """A fresh ``TrainingProgress``, or the one saved in ``run.resume_dir`` with the adapters,
    optimizer, scheduler, RNG and sampler seed restored (into the shards when distributed).
    Resuming a run that already trained its ``total_steps`` says so, names its outputs and
    raises ``RunFinished`` (the recipe exits 0).

    The data position counts GLOBAL micro-batches (``batch_size`` x world size), so a
    checkpoint resumes on any world size that keeps that product, and on one device.

    A state folder that does not load is passed over (with a warning) for the next older intact
    checkpoint; ``run.resume_dir`` then names the one used.

    Raises:
        ConfigError: the checkpoint was written with another (global) micro-batch.
        CheckpointError: no checkpoint's state loads.
        RunFinished: nothing is left to train.
    """
    cfg, resume_dir = run.cfg, run.resume_dir
    if resume_dir is None:
        return TrainingProgress(sampler_seed=cfg.seed, batch_size=run.global_batch)
    while True:  # a state that does not load (a damaged file of the right size): the next older intact one
        try:
            if run.distributed:
                progress = load_sharded_state(resume_dir / "state", model, optimizer, scheduler)
            else:
                progress = load_state(resume_dir / "state", model=model, optimizer=optimizer, scheduler=scheduler)
            break
        except CheckpointError as e:
            older, _ = run.manager.latest_intact(before=int(resume_dir.name.removeprefix("step_")))
            if older is None:
                raise
            say(f"warning: {e}; resuming from {older.name} instead")
            resume_dir = run.resume_dir = older
    if progress.batch_size not in (None, run.global_batch):
        if run.distributed:
            raise ConfigError(f"resume: {resume_dir.name} was written with a global micro-batch of "
                              f"{progress.batch_size} (batch_size x world size), not {run.global_batch}; "
                              f"set batch_size={progress.batch_size // run.world} for {run.world} rank(s)")
        raise ConfigError(f"resume: {resume_dir.name} was written with batch_size={progress.batch_size}, "
                          f"not {cfg.batch_size}; resume with the same batch_size")
    if progress.step >= total_steps:
        say(f"{run.output_dir} is finished ({resume_dir.name} is the last of its {total_steps} steps): nothing to "
            "train; raise epochs or max_steps to train on, or pick another output_dir. Its outputs:")
        report_outputs(run, resume_dir)  # and the export_gguf step, if a killed run left it undone
        raise RunFinished(str(resume_dir))
    sampler.seed = progress.sampler_seed
    apply_resume_changes(run.changes, optimizer, scheduler)
    say(f"resumed from {resume_dir} (step {progress.step}, epoch {progress.epoch})")
    return progress


def save_checkpoint(run: Run, progress: TrainingProgress, *, model, optimizer, scheduler, final: bool) -> Path:
    """Write ``step_N``: the PEFT adapter, the merged HF folder when ``save_merged`` asks for it
    at this save, and the resume state (COMPLETE last, see ``CheckpointManager.save``).

    Distributed (collective: every rank calls): all ranks gather the full adapter (and, for a
    merged export, the full model) and optimizer state onto rank 0, which loads them into a CPU
    "export model" and writes the same folder one device writes; the others wait at a barrier,
    so no rank runs ahead of a half-written checkpoint.
    """
    cfg = run.cfg
    _check_finite_weights(run, model, progress.step)
    merged = cfg.save_merged == "always" or (final and cfg.save_merged == "final")
    if run.distributed:
        full_state = gather_full_state(model, trainable_only=not merged)
        full_optimizer = gathered_optimizer_state(optimizer)
        if is_rank0():
            # parameters missing from full_state (adapter-only saves) stay on meta: no memory
            model = build_meta_model(model.args, run.dtype, lora_settings(cfg), cfg.quantize)
            model.load_state_dict(full_state, strict=False, assign=True)
            optimizer = types.SimpleNamespace(state_dict=lambda: full_optimizer)
    if is_rank0():
        lora = lora_settings(cfg)
        writers = {} if lora is None else {
            "adapter": adapter_writer(model, base_model_name_or_path=cfg.checkpoint_dir, lora_cfg=lora)}
        if merged:  # full fine-tuning: the model itself (nothing to merge)
            writers[MERGED] = merged_writer(model, source_dir=cfg.checkpoint_dir, tokenizer_dir=cfg.tokenizer)
        writers["state"] = state_writer(progress, model=model, optimizer=optimizer, scheduler=scheduler)
        run.manager.save(progress.step, writers)
    barrier()
    return step_dir(run.output_dir, progress.step)


def _check_finite_weights(run: Run, model: nn.Module, step: int) -> None:
    """Refuse to save weights the optimizer step made non-finite (the loss and gradients were
    finite, so only the update can have done it): a COMPLETE checkpoint must never be a
    poisoned one. One device sync (and one all-reduce when distributed) per save.

    Raises:
        NonFiniteLossError: a trainable weight holds nan/inf; nothing of this step is written.
    """
    local = [local_tensor(p).detach() for p in model.parameters() if p.requires_grad]
    bad = float((~torch.stack([torch.isfinite(t).all() for t in local])).sum()) if local else 0.0
    if all_reduce_sum([bad], run.device)[0] > 0:
        newest = run.manager.latest_complete()
        raise NonFiniteLossError(
            f"the trainable weights hold nan/inf after step {step}; stopped without saving it (the newest "
            f"checkpoint is {newest or 'none'}); lower optimizer.lr, set max_grad_norm or use dtype=fp32")


def save_final(run: Run, progress: TrainingProgress, *, model, optimizer, scheduler) -> Path:
    """The end-of-training save, then :func:`report_outputs`. Returns the step folder."""
    final_dir = save_checkpoint(run, progress, model=model, optimizer=optimizer, scheduler=scheduler, final=True)
    report_outputs(run, final_dir)
    return final_dir


def report_outputs(run: Run, final_dir: Path) -> None:
    """Print where the adapter and merged model are, then run the ``export_gguf`` step (rank 0
    alone: no collective waits on an export of minutes; a GGUF already there is kept)."""
    if (final_dir / "adapter").is_dir():
        say(f"adapter: {final_dir / 'adapter'}")
    if (final_dir / MERGED).is_dir():
        say(f"{'merged ' if lora_settings(run.cfg) is not None else ''}model: {final_dir / MERGED}")
    if is_rank0() and (gguf := export_gguf_step(run.cfg, final_dir)) is not None:
        say(f"gguf: {gguf}")
