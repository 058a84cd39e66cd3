"""One home for training state: checkpoint folders, resume, RNG and data position.

Every recipe saves and resumes through this file, so the copies cannot drift apart.

Layout written by :class:`CheckpointManager` (the folder names are ``tunelab.run_layout``'s)::

    output_dir/step_N/adapter/    PEFT adapter (adapter_model.safetensors + adapter_config.json)
    output_dir/step_N/merged/     HF folder with the LoRA weights merged in (per save_merged)
    output_dir/step_N/state/      everything resume needs, safetensors + json, no pickle:
        trainable.safetensors     trainable parameters by native name (exact resume)
        optimizer.safetensors     optimizer tensors, keys "state.<param index>.<name>"
        optimizer.json            param_groups + non-tensor optimizer state
        scheduler.json            lr scheduler state_dict
        rng.safetensors/rng.json  torch cpu (+cuda) generator states, python random, numpy
        progress.json             step, epoch, batches consumed in the epoch, sampler seed
    output_dir/step_N/COMPLETE    written last; a folder without it is ignored

A step folder is first written as ``output_dir/.tmp_step_N_<pid>`` and renamed into place, then
``COMPLETE`` is written (to a temp name + rename), so a killed run never leaves a folder that
resume would trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler

from tunelab.errors import CheckpointError, ConfigError
from tunelab.run_layout import COMPLETE, complete_steps, step_dir, step_dirs, write_atomic
from tunelab.training.config import config_to_dict



# --------------------------------------------------------------------------- data position
@dataclass
class TrainingProgress:
    """Where training is: ``step`` optimizer steps done; ``batches_consumed`` micro-batches of
    epoch ``epoch`` already used (the data position), each of ``batch_size`` samples;
    ``sampler_seed`` orders the data."""

    step: int = 0
    epoch: int = 0
    batches_consumed: int = 0
    sampler_seed: int = 0
    batch_size: int | None = None


class ResumableSampler(Sampler[int]):
    """Shuffles ``range(num_samples)`` with a fresh permutation per epoch, seeded by
    ``seed + epoch`` (independent of the global RNG), and can start part-way into an epoch.

    Args:
        num_samples: dataset length.
        seed: base seed of the permutations.
        shuffle: False keeps the dataset order.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Iterate epoch ``epoch`` beginning with its ``start_sample``-th sample."""
        self.epoch = epoch
        self.start = start_sample

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class RankSampler(ResumableSampler):
    """``ResumableSampler`` split over ranks like ``DistributedSampler``: rank ``r`` of ``w``
    takes positions ``r, r + w, r + 2w, ...`` of the epoch's order (after ``start``).

    With ``batch_size`` b per rank, micro-batch k of every rank together holds exactly the
    samples ``order[start + k*b*w : start + (k+1)*b*w]``, i.e. the k-th micro-batch of one
    device running batch_size b*w: losses match single device for the same global batch and
    the data position (global micro-batches consumed) is independent of the world size.

    Args:
        num_samples: dataset length.
        seed: base seed of the per-epoch permutations (as ResumableSampler).
        rank, world_size: this rank and the number of ranks.
        shuffle: False keeps the dataset order.
    """

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, shuffle: bool = True):
        super().__init__(num_samples, seed, shuffle=shuffle)
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :][self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples - self.start, self.world_size))


# --------------------------------------------------------------------------- RNG
def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Generator states as (tensors for safetensors, json-able metadata)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    meta: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        return tensors, meta
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
    meta["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        import numpy as np

        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))


# --------------------------------------------------------------------------- optimizer
def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<idx>.<name>``) and json."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], current_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; json lists become tuples where the live
    optimizer holds tuples (e.g. AdamW's betas)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for saved, live in zip(meta["param_groups"], current_groups):
        group = dict(saved)
        for k, v in group.items():
            if isinstance(live.get(k), tuple) and isinstance(v, list):
                group[k] = tuple(v)
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- state folder
def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def save_state(
    state_dir: str | Path,
    *,
    progress: TrainingProgress,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> None:
    """Write everything resume needs into ``state_dir`` (safetensors + json, no pickle).

    Args:
        state_dir: folder to create.
        progress: step / epoch / data position.
        model: its trainable parameters (requires_grad) are saved by name.
        optimizer: saved via its state_dict, tensors flattened.
        scheduler: anything with a json-able ``state_dict()`` (e.g. LambdaLR).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(state_dir / "trainable.safetensors"))
    if optimizer is not None:
        tensors, meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        _write_json(state_dir / "optimizer.json", meta)
    if scheduler is not None:
        _write_json(state_dir / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_meta = capture_rng_state()
    save_file(rng_tensors, str(state_dir / "rng.safetensors"))
    _write_json(state_dir / "rng.json", rng_meta)
    _write_json(state_dir / "progress.json", dataclasses.asdict(progress))


def load_state(
    state_dir: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> TrainingProgress:
    """Restore what :func:`save_state` wrote into live objects; returns the progress.

    Raises:
        CheckpointError: missing files, or trainable parameters that do not match the model.
    """
    state_dir = Path(state_dir)
    if not (state_dir / "progress.json").is_file():
        raise CheckpointError(f"{state_dir} has no progress.json; it is not a tunelab state folder")
    try:
        if model is not None:
            saved = load_file(str(state_dir / "trainable.safetensors"))
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            if set(saved) != set(params):
                missing = sorted(set(params) - set(saved))[:3]
                extra = sorted(set(saved) - set(params))[:3]
                raise CheckpointError(
                    f"{state_dir}: trainable parameters do not match the model (missing {missing}, "
                    f"unexpected {extra}); resume with the same lora settings"
                )
            with torch.no_grad():
                for name, p in params.items():
                    if saved[name].shape != p.shape:
                        raise CheckpointError(
                            f"{state_dir}: {name} has shape {tuple(saved[name].shape)}, the model "
                            f"{tuple(p.shape)}; resume with the same lora settings"
                        )
                    p.copy_(saved[name])
        if optimizer is not None:
            meta = json.loads((state_dir / "optimizer.json").read_text(encoding="utf-8"))
            tensors = load_file(str(state_dir / "optimizer.safetensors"))
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta, optimizer.param_groups))
        if scheduler is not None:
            scheduler.load_state_dict(json.loads((state_dir / "scheduler.json").read_text(encoding="utf-8")))
        if restore_rng:
            restore_rng_state(
                load_file(str(state_dir / "rng.safetensors")),
                json.loads((state_dir / "rng.json").read_text(encoding="utf-8")),
            )
        progress = json.loads((state_dir / "progress.json").read_text(encoding="utf-8"))
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{state_dir} is incomplete ({Path(e.filename).name} missing); resume from another step") from None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # a damaged file
        raise CheckpointError(f"{state_dir} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                              "resume from another step") from None
    return TrainingProgress(**progress)


# --------------------------------------------------------------------------- resumed settings
# Settings a resumed run may not change: they define the model and its adapters, the data and
# its order, and how samples group into steps (the saved data position counts micro-batches).
# batch_size is checked against the saved position itself (it may change with the world size).
FIXED_ON_RESUME = ("checkpoint_dir", "tokenizer", "quantize", "dtype", "lora.rank", "lora.alpha", "lora.targets",
                   "lora.use_dora", "dataset", "seed", "max_seq_len", "packing", "gradient_accumulation_steps",
                   "optimizer._component_")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def resume_changes(previous: Path, cfg) -> dict[str, tuple[Any, Any]]:
    """The settings that differ from ``previous`` (the config.yaml of the run that wrote the
    checkpoints), printed as one line; the others (lr, schedule, max_steps, cadences, ...) are
    applied by :func:`apply_resume_changes` once the state is loaded.

    Raises:
        ConfigError: a setting of ``FIXED_ON_RESUME`` changed.
    """
    try:
        then = _flat(yaml.safe_load(previous.read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        print(f"notice: {previous} is missing or unreadable; the resumed settings are not compared", flush=True)
        return {}
    now = _flat(config_to_dict(cfg))
    changes = {k: (then[k], v) for k, v in now.items() if k in then and then[k] != v and k != "resume"}
    for key, (old, new) in changes.items():
        if key in FIXED_ON_RESUME or key.startswith(tuple(f"{fixed}." for fixed in FIXED_ON_RESUME)):
            raise ConfigError(f"resume: {key}={old} wrote these checkpoints, {new} now; it cannot change on "
                              f"resume (set it back, or start a new run in another output_dir)")
    if changes:
        print("resume: changed since the checkpoints: "
              + "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()), flush=True)
    return changes


def apply_resume_changes(changes: dict[str, tuple[Any, Any]], optimizer, scheduler) -> None:
    """Make the restored optimizer and lr schedule follow the config as it is now: changed
    optimizer settings (lr, weight_decay, betas, ...) go into its param groups (the saved state
    restored the old ones), and the lr of the next step is the schedule's as configured now
    (shape, length, base lr) at the saved position."""
    if not changes:
        return
    settings = {k.removeprefix("optimizer."): new for k, (_, new) in changes.items() if k.startswith("optimizer.")}
    for group in optimizer.param_groups:
        for name, value in settings.items():
            if name in group:
                group[name] = type(group[name])(value) if isinstance(group[name], tuple) else value
    if "lr" in settings:
        scheduler.base_lrs = [settings["lr"]] * len(scheduler.base_lrs)
        for group in optimizer.param_groups:
            group["initial_lr"] = settings["lr"]
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


# --------------------------------------------------------------------------- step folders
Writer = Callable[[Path], None]


class CheckpointManager:
    """Creates, lists and prunes ``output_dir/step_N`` folders.

    Args:
        output_dir: the run folder.
        keep_last_n: complete step folders kept after each save (>= 1); older ones are
            deleted, the newest complete one never is.
    """

    def __init__(self, output_dir: str | Path, keep_last_n: int):
        if keep_last_n < 1:
            raise CheckpointError(f"keep_last_n_checkpoints must be >= 1, got {keep_last_n}")
        self.output_dir = Path(output_dir)
        self.keep_last_n = keep_last_n

    def step_dirs(self) -> dict[int, Path]:
        """All ``step_N`` folders (complete or not) by step (``tunelab.run_layout``)."""
        return step_dirs(self.output_dir)

    def complete_steps(self) -> list[int]:
        """Steps whose folder has the COMPLETE marker, ascending."""
        return complete_steps(self.output_dir)

    def latest_complete(self) -> Path | None:
        """The newest complete step folder (what resume uses), or None."""
        steps = self.complete_steps()
        return step_dir(self.output_dir, steps[-1]) if steps else None

    def damage(self, folder: Path) -> str | None:
        """What is wrong with a complete step folder: a file its COMPLETE marker lists that is
        missing or of another size, or an unreadable marker; None when it is intact. A marker
        without a file list (written before tunelab recorded one) is trusted."""
        try:
            marker = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "its COMPLETE marker is unreadable"
        files = marker.get("files") if isinstance(marker, dict) else None
        for rel, size in (files or {}).items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != size:
                return f"{rel} has {path.stat().st_size} bytes, not {size}"
        return None

    def latest_intact(self, before: int | None = None) -> tuple[Path | None, list[str]]:
        """The newest complete step folder that is intact (what resume uses; of the steps
        below ``before`` if given), and one line per newer complete folder passed over, saying
        what is wrong with it."""
        passed_over = []
        for step in reversed(self.complete_steps()):
            if before is not None and step >= before:
                continue
            folder = step_dir(self.output_dir, step)
            problem = self.damage(folder)
            if problem is None:
                return folder, passed_over
            passed_over.append(f"{folder.name}: {problem}")
        return None, passed_over

    def save(self, step: int, writers: Mapping[str, Writer]) -> Path:
        """Write ``step_N/<name>`` with each writer (called with the folder to create), then
        the COMPLETE marker, then prune. Returns the step folder.

        Args:
            step: optimizer step number (folder name).
            writers: subfolder name -> function writing that subfolder, e.g.
                ``{"adapter": ..., "merged": ..., "state": ...}``.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = step_dir(self.output_dir, step)
        tmp = self.output_dir / f".tmp_step_{step}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name, write in writers.items():
                write(tmp / name)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):  # a full disk, a quota, a read-only mount: the user's to fix
                kept = self.latest_complete()
                raise CheckpointError(f"saving {final.name} failed ({e.strerror or e}); nothing of it was kept "
                                      f"(the newest checkpoint is {kept or 'none'}); free space in "
                                      f"{self.output_dir} and resume=true") from None
            raise
        if final.exists():  # an incomplete leftover of a killed run, or a re-save of this step
            trash = self.output_dir / f".trash_step_{step}_{os.getpid()}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        # every file with its size: resume checks them before trusting the folder (damage())
        files = {p.relative_to(final).as_posix(): p.stat().st_size for p in sorted(final.rglob("*")) if p.is_file()}
        marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": sorted(writers),
                  "files": files}
        write_atomic(final / COMPLETE, json.dumps(marker) + "\n")
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep_last_n`` complete folders; drop incomplete folders older than
        the newest complete one and temp folders of dead writers."""
        complete = self.complete_steps()
        if not complete:
            return
        keep = set(complete[-self.keep_last_n :])
        for step, folder in self.step_dirs().items():
            if step not in keep and step < complete[-1]:
                # the marker first: a kill mid-delete must not leave COMPLETE beside missing files
                (folder / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
        for child in self.output_dir.iterdir():
            if child.name.startswith((".tmp_step_", ".trash_step_")) and not child.name.endswith(f"_{os.getpid()}"):
                shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- writers
def state_writer(
    progress: TrainingProgress,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> Writer:
    """A writer for ``CheckpointManager.save`` that calls :func:`save_state`."""
    progress = dataclasses.replace(progress)  # freeze the values at call time
    return lambda folder: save_state(folder, progress=progress, model=model, optimizer=optimizer, scheduler=scheduler)


def adapter_writer(model: torch.nn.Module, *, base_model_name_or_path: str, lora_cfg: Any) -> Writer:
    """A writer saving the LoRA adapter in PEFT format (``tunelab.models.adapters.save_adapter``)."""

    def write(folder: Path) -> None:
        from tunelab.models.adapters import save_adapter

        save_adapter(model, folder, base_model_name_or_path=base_model_name_or_path, lora_cfg=lora_cfg)

    return write


def merged_writer(model: torch.nn.Module, *, source_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Writer:
    """A writer saving an HF folder with the LoRA weights merged in.

    Args:
        model: the native model with LoRA layers (left unchanged).
        source_dir: the base checkpoint (config.json read, tokenizer/generation files copied).
        tokenizer_dir: a separately given tokenizer (file or folder) whose files are copied too.
    """

    def write(folder: Path) -> None:
        from tunelab.models import save_pretrained
        from tunelab.modules.peft import merge_lora_state_dict

        save_pretrained(merge_lora_state_dict(model), folder, source_dir=source_dir, args=model.args)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, folder)

    return write


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(tokenizer_path: str | Path, out_dir: str | Path) -> None:
    """Copy tokenizer files from a tokenizer file or folder (or its original/) into out_dir."""
    src = Path(tokenizer_path)
    out_dir = Path(out_dir)
    if src.is_file():
        name = "tokenizer.model" if src.suffix == ".model" else src.name
        shutil.copyfile(src, out_dir / name)
        return
    for folder in (src, src / "original"):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and not (out_dir / name).exists():
                shutil.copyfile(folder / name, out_dir / name)
