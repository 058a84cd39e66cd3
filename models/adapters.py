"""LoRA adapters on disk in the Hugging Face PEFT format.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; PEFT's
``PeftModel.from_pretrained(hf_model, folder)`` loads what ``save_adapter`` writes, and
``load_adapter`` loads what PEFT's ``save_pretrained`` writes (plain LoRA only).

Tensor names use the HF module paths under PEFT's ``base_model.model.`` prefix::

    native  layers.0.attn.q_proj.lora_a.weight   [r, in]
    PEFT    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    native  output.lora_b.weight                 [vocab, r]
    PEFT    base_model.model.lm_head.lora_B.weight

The math is the same on both sides (``W0 x + (lora_alpha / r) B A x``), so the adapter
tensors are written as they are, in the adapter's dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import CheckpointError
from tunelab.models.checkpoint import hf_to_native_key, native_to_hf_key
from tunelab.modules.peft.lora import (
    EXPERT_TARGET,
    LoRALinear,
    apply_expert_lora,
    apply_lora_to_modules,
    expert_lora_modules,
    linear_layer_names,
    lora_modules,
)

__all__ = ["save_adapter", "load_adapter", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# base_model.model.<hf path>.lora_A[.<adapter name>].weight; PEFT writes no adapter name, but
# some versions/tools keep it (".default.").
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# DoRA's magnitude vector: PEFT writes <module>.lora_magnitude_vector (older files may keep the
# adapter name, newer in-memory names end in .weight)
_MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
# PEFT's LoRA on an MoE layer's expert parameters (target_parameters): one ParamWrapper per
# targeted parameter around the experts module, the first listed innermost (".base_layer" once
# per wrapper outside it)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_EXPERT_KEY_RE = re.compile(r"^(?P<module>.+\.mlp\.experts)(?P<depth>(?:\.base_layer)*)\.lora_(?P<which>[AB])"
                            r"(?:\.[^.]+)?\.weight$")

# adapter_config.json settings that change the math or the set of trained tensors; tunelab
# loads plain LoRA only, so any of these being set is refused rather than silently ignored.
_UNSUPPORTED = {
    "use_rslora": "rsLoRA scales by alpha/sqrt(r)",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "LoRA-B bias terms",
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "layers_to_transform": "layer subsets",
    "layer_replication": "layer replication",
    "exclude_modules": "excluded modules",
    "trainable_token_indices": "trainable token rows",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# Initialisations that also rewrite the base weights: the adapter only fits the modified base.
_BASE_MODIFYING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _hf_module(native_module: str, args=None) -> str:
    """``layers.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``: the module path in the
    transformers model PEFT wraps (an image-text model's language model sits at
    ``model.language_model.`` there, whatever its checkpoint files call it)."""
    hf = native_to_hf_key(f"{native_module}.weight").removesuffix(".weight")
    if getattr(args, "multimodal", False) and hf.startswith("model."):
        hf = "model.language_model." + hf.removeprefix("model.")
    return hf


def _native_module(hf_module: str, args=None) -> str:
    return hf_to_native_key(f"{hf_module}.weight", args).removesuffix(".weight")


def _hf_experts(native_experts: str, args) -> str:
    """``layers.1.mlp.experts`` -> ``model.layers.1.mlp.experts`` (in PEFT's module tree), through
    the router's name: experts have no weight of their own in the name tables."""
    return _hf_module(native_experts.removesuffix(".experts") + ".gate", args).removesuffix(".gate") + ".experts"


def _native_experts(hf_experts: str, args) -> str:
    """The reverse of :func:`_hf_experts`. Raises KeyError for a path of no layer."""
    return _native_module(hf_experts.removesuffix(".experts") + ".gate", args).removesuffix(".gate") + ".experts"


def _expert_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The expert LoRA weights in PEFT's layout (``lora_A`` [E*r, in], ``lora_B`` [out, r*E],
    expert index fastest) and the ``target_parameters`` naming them."""
    experts = list(expert_lora_modules(model))
    leaves = [w for w in ("gate_up_lora", "down_lora") if any(n.endswith("." + w) for n, _ in experts)]
    targets = [f"mlp.experts.{w.removesuffix('_lora')}_proj" for w in leaves]
    tensors = {}
    for name, m in experts:
        module, _, leaf = name.rpartition(".")  # layers.1.mlp.experts, gate_up_lora
        depth = len(leaves) - 1 - leaves.index(leaf)
        key = _PREFIX + _hf_experts(module, model.args) + ".base_layer" * depth
        e, r, in_dim = m.lora_a.shape
        tensors[f"{key}.lora_A.weight"] = m.lora_a.detach().reshape(e * r, in_dim).cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = m.lora_b.detach().permute(1, 2, 0).reshape(-1, r * e).cpu().contiguous()
    return tensors, targets


def _cfg_value(lora_cfg: Any, name: str) -> Any:
    if lora_cfg is None:
        return None
    if isinstance(lora_cfg, Mapping):
        return lora_cfg.get(name)
    return getattr(lora_cfg, name, None)


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    lora_cfg: Any = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    targets: str | Iterable[str] | None = None,
) -> Path:
    """Write the model's LoRA adapters as a PEFT folder (config + safetensors).

    Rank, alpha, dropout and the targeted layers are read from the model's ``LoRALinear``
    layers; ``lora_cfg`` (an object or mapping with ``rank``/``alpha``/``dropout``/``targets``)
    or the matching keywords, when given, are checked against them so a config that does not
    describe the model cannot be written.

    Args:
        model: a model with LoRA applied (native names).
        out_dir: folder to write (created if needed; existing adapter files are replaced).
        base_model_name_or_path: recorded in adapter_config.json (hub id or local folder).
        lora_cfg: optional LoRA settings to cross-check.
        rank, alpha, dropout, targets: optional, same as in ``lora_cfg``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: the model has no LoRA layers, mixed ranks/alphas, adapters on the meta
            device, or settings that disagree with the model (a caller bug, not user input).
    """
    modules = list(lora_modules(model))
    experts = list(expert_lora_modules(model))
    if not modules and not experts:
        raise ValueError("save_adapter: the model has no LoRALinear layers (call apply_lora first)")
    ranks = {m.rank for _, m in modules + experts}
    alphas = {float(m.alpha) for _, m in modules + experts}
    dropouts = {m.dropout_p for _, m in modules}
    doras = {m.use_dora for _, m in modules}
    if len(ranks) > 1 or len(alphas) > 1 or len(dropouts) > 1 or len(doras) > 1:
        raise ValueError(
            f"save_adapter: mixed LoRA settings (ranks {sorted(ranks)}, alphas {sorted(alphas)}, "
            f"dropouts {sorted(dropouts)}, DoRA {sorted(doras)}); the PEFT config holds one of each"
        )
    use_dora = doras.pop() if doras else False
    r, a, p = ranks.pop(), alphas.pop(), dropouts.pop()
    native_leaves = {name.rpartition(".")[2] for name, _ in modules} | ({EXPERT_TARGET} if experts else set())

    given = dict(
        rank=rank if rank is not None else _cfg_value(lora_cfg, "rank"),
        alpha=alpha if alpha is not None else _cfg_value(lora_cfg, "alpha"),
        dropout=dropout if dropout is not None else _cfg_value(lora_cfg, "dropout"),
    )
    actual = dict(rank=r, alpha=a, dropout=p)
    for key, value in given.items():
        if value is not None and float(value) != float(actual[key]):
            raise ValueError(
                f"save_adapter: {key}={value} but the model's LoRA layers have {actual[key]}"
            )
    want_targets = targets if targets is not None else _cfg_value(lora_cfg, "targets")
    if want_targets is not None and not isinstance(want_targets, str):
        if set(want_targets) != native_leaves:
            raise ValueError(
                f"save_adapter: targets {sorted(want_targets)} but the model has LoRA on "
                f"{sorted(native_leaves)}"
            )

    tensors: dict[str, torch.Tensor] = {}
    hf_paths = []
    for name, m in modules:
        if m.lora_a.weight.is_meta:
            raise ValueError(f"save_adapter: {name} adapter weights are on the meta device")
        hf = _hf_module(name, model.args)
        hf_paths.append(hf)
        tensors[f"{_PREFIX}{hf}.lora_A.weight"] = m.lora_a.weight.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{hf}.lora_B.weight"] = m.lora_b.weight.detach().cpu().contiguous()
        if use_dora:
            tensors[f"{_PREFIX}{hf}.lora_magnitude_vector"] = m.lora_magnitude.detach().cpu().contiguous()

    expert_tensors, target_parameters = _expert_tensors(model)
    tensors.update(expert_tensors)
    # PEFT matches a target name against the end of each module path. Leaf names describe the
    # model when every layer with that leaf is adapted (and no vision tower shares the leaf
    # names, and no expert parameter: PEFT 0.22 also wraps experts.gate_up_proj again for a
    # "gate_proj" / "up_proj" leaf target); otherwise list the exact paths.
    all_linear = linear_layer_names(model)
    adapted = {name for name, _ in modules}
    target_modules = set()
    for hf, (name, _) in zip(hf_paths, modules):
        leaf = name.rpartition(".")[2]
        full_cover = not model.args.multimodal and not experts and all(n in adapted for n in all_linear
                                                                       if n.rpartition(".")[2] == leaf)
        target_modules.add(hf.rpartition(".")[2] if full_cover else hf)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _json_number(a),
        "lora_dropout": p,
        "target_modules": sorted(target_modules),
        **({"target_parameters": target_parameters} if target_parameters else {}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _read_config(adapter_dir: Path) -> tuple[Path, dict]:
    if not adapter_dir.is_dir():
        raise CheckpointError(f"adapter folder {adapter_dir} does not exist")
    cfg_path = adapter_dir / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{adapter_dir} has no {ADAPTER_CONFIG_NAME}; point adapter_dir at a folder written "
            "by tunelab (step_N/adapter) or by PEFT's save_pretrained"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{cfg_path}: peft_type is {peft_type!r}; only LORA adapters can be loaded"
        )
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise CheckpointError(
            f"{cfg_path}: bias={bias!r} is not supported; only bias='none' LoRA loads"
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(
                f"{cfg_path}: {key}={cfg[key]!r} ({what}) is not supported; "
                "tunelab loads plain LoRA"
            )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INIT):
        raise CheckpointError(
            f"{cfg_path}: init_lora_weights={init!r} changes the base weights; convert the adapter "
            "to plain LoRA with PEFT (path_initial_model_for_weight_conversion) first"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise CheckpointError(f"{cfg_path}: missing {key!r}")
    params = cfg.get("target_parameters") or []
    if not isinstance(params, list) or any(p not in EXPERT_PARAMETERS for p in params):
        raise CheckpointError(f"{cfg_path}: target_parameters={params!r} is not supported; tunelab loads LoRA on "
                              f"the MoE expert weights {list(EXPERT_PARAMETERS)}")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    alpha = cfg["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise CheckpointError(f"{cfg_path}: lora_alpha must be a positive number, got {alpha!r}")
    return cfg_path, cfg


def _targeted_modules(model: nn.Module, target_modules: Any, cfg_path: Path) -> set[str]:
    """Native names of the linear layers PEFT would adapt for ``target_modules``."""
    linears = {}
    for name in linear_layer_names(model):
        try:
            linears[name] = _hf_module(name, model.args)
        except KeyError:
            continue  # a layer with no HF name cannot be targeted by a PEFT adapter
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return {n for n, hf in linears.items() if hf != "lm_head"}
        return {n for n, hf in linears.items() if re.fullmatch(target_modules, hf)}
    if not isinstance(target_modules, list) or not all(isinstance(t, str) for t in target_modules):
        raise CheckpointError(f"{cfg_path}: target_modules must be a list of names or a string")
    return {
        n for n, hf in linears.items()
        if any(hf == t or hf.endswith("." + t) for t in target_modules)
    }


def _load_expert_lora(model: nn.Module, tensors: dict, cfg: dict, where: Path,
                      adapter_dtype: torch.dtype | None) -> dict:
    """Put the file's expert LoRA weights (``target_parameters``) on the model's experts; return
    the other tensors."""
    params = cfg.get("target_parameters") or []
    if not params:
        return tensors
    rest, pairs = {}, {}
    for key, tensor in tensors.items():
        m = _EXPERT_KEY_RE.match(key.removeprefix(_PREFIX)) if key.startswith(_PREFIX) else None
        if m is None:
            rest[key] = tensor
            continue
        depth = m["depth"].count(".base_layer")
        if depth >= len(params):
            raise CheckpointError(f"{where}: key {key!r} is nested deeper than target_parameters {params!r} allows")
        try:
            native = _native_experts(m["module"], model.args)
        except KeyError:
            raise CheckpointError(f"{where}: key {key!r} names no layer of this model "
                                  "(different base model?)") from None
        leaf = params[len(params) - 1 - depth].rpartition(".")[2].removesuffix("_proj") + "_lora"
        pairs.setdefault(f"{native}.{leaf}", {})[m["which"]] = (key, tensor)
    if next(expert_lora_modules(model), None) is None:
        apply_expert_lora(model, cfg["r"], cfg["lora_alpha"], adapter_dtype=adapter_dtype)
    modules = dict(expert_lora_modules(model))
    with torch.no_grad():
        for name, pair in pairs.items():
            lora = modules.get(name)
            if lora is None or set(pair) != {"A", "B"}:
                raise CheckpointError(f"{where}: expert LoRA for {name} does not fit this model (or lacks A or B)")
            e, r, in_dim = lora.lora_a.shape
            out_dim = lora.lora_b.shape[1]
            a, b = pair["A"][1], pair["B"][1]
            if tuple(a.shape) != (e * r, in_dim) or tuple(b.shape) != (out_dim, r * e):
                raise CheckpointError(f"{where}: {pair['A'][0]} / lora_B have shapes {list(a.shape)} / "
                                      f"{list(b.shape)}, expected {[e * r, in_dim]} / {[out_dim, r * e]}")
            for param, value in (("lora_a", a.reshape(e, r, in_dim)),
                                 ("lora_b", b.reshape(out_dim, r, e).permute(2, 0, 1))):
                mine = getattr(lora, param)
                if mine.is_meta:  # copy_ into meta is a no-op: put a real tensor there
                    setattr(lora, param, nn.Parameter(value.to(mine.dtype).contiguous(),
                                                      requires_grad=mine.requires_grad))
                else:
                    mine.copy_(value)
    return rest


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, *, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply LoRA as described by a PEFT adapter folder and load its weights (in place).

    Layers that already are ``LoRALinear`` (same rank and alpha) are reused; plain
    ``nn.Linear`` layers are wrapped. Everything is checked before the model is changed, so a
    failed load leaves it as it was.

    Args:
        model: a native model (e.g. from ``from_pretrained``).
        adapter_dir: folder with adapter_config.json and adapter_model.safetensors.
        adapter_dtype: dtype for the adapter weights (default: each base weight's dtype).

    Returns:
        The same model.

    Raises:
        CheckpointError: missing files, a non-LoRA or unsupported LoRA variant, keys the model
            has no layer for, missing A/B pairs or shape mismatches (the message names the file
            and key).
    """
    adapter_dir = Path(adapter_dir)
    cfg_path, cfg = _read_config(adapter_dir)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    dropout = float(cfg.get("lora_dropout") or 0.0)

    weights_path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        hint = " (pickle .bin adapters are not loaded; re-save with safetensors)" if (
            adapter_dir / "adapter_model.bin"
        ).is_file() else ""
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_WEIGHTS_NAME}{hint}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path} cannot be read ({e})") from None

    use_dora = bool(cfg.get("use_dora"))
    tensors = _load_expert_lora(model, tensors, cfg, weights_path, adapter_dtype)
    # group the file's tensors by native module: {module: {"A": (key, tensor), "B": ..., "M": ...}}
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapter_names = set()
    for key, tensor in tensors.items():
        short = key.removeprefix(_PREFIX)
        m = (_KEY_RE.match(short) or _MAGNITUDE_RE.match(short)) if key.startswith(_PREFIX) else None
        if m is None or ("which" not in m.groupdict() and not use_dora):
            want = "lora_A/B.weight" + (" or .lora_magnitude_vector" if use_dora else "")
            raise CheckpointError(f"{weights_path}: unexpected key {key!r} (want base_model.model.<module>.{want})")
        adapter_names.add(m["adapter"])
        try:
            native = _native_module(m["module"], model.args)
        except KeyError:
            raise CheckpointError(
                f"{weights_path}: key {key!r} names no layer of this model (different base model?)"
            ) from None
        found.setdefault(native, {})[m.groupdict().get("which", "M")] = (key, tensor)
    if len(adapter_names) > 1:
        names = sorted(map(str, adapter_names))
        raise CheckpointError(f"{weights_path}: holds several adapters {names}; keep one")

    targeted = _targeted_modules(model, cfg["target_modules"], cfg_path)
    for native, pair in sorted(found.items()):
        key = next(iter(pair.values()))[0]
        if native not in targeted:
            raise CheckpointError(
                f"{weights_path}: key {key!r} is for a layer the model does not have or "
                f"target_modules {cfg['target_modules']!r} does not name (different base model?)"
            )
        missing = [f"lora_{w}" if w != "M" else "lora_magnitude_vector"
                   for w in ("A", "B", "M") if w not in pair and (w != "M" or use_dora)]
        if missing:
            raise CheckpointError(f"{weights_path}: key {key!r} has no matching {missing[0]} tensor"
                                  + (" (use_dora is true in adapter_config.json)" if missing[0].endswith("vector") else ""))
    missing = sorted(targeted - set(found))
    if missing:
        raise CheckpointError(
            f"{weights_path}: no adapter weights for {_PREFIX}{_hf_module(missing[0], model.args)} "
            f"({len(missing)} targeted layer(s) missing); wrong base model or truncated file?"
        )

    for native, pair in found.items():
        layer = model.get_submodule(native)
        if isinstance(layer, LoRALinear):
            in_dim, out_dim = layer.in_dim, layer.out_dim
            if layer.rank != r or float(layer.alpha) != float(alpha) or layer.use_dora != use_dora:
                raise CheckpointError(
                    f"{cfg_path}: r={r}, lora_alpha={alpha}, use_dora={use_dora} but {native} already has LoRA "
                    f"with rank={layer.rank}, alpha={layer.alpha}, use_dora={layer.use_dora}"
                )
        else:
            in_dim, out_dim = layer.in_features, layer.out_features
        for which, want in (("A", (r, in_dim)), ("B", (out_dim, r)), ("M", (out_dim,))):
            if which not in pair:
                continue
            key, tensor = pair[which]
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{weights_path}: {key} has shape {list(tensor.shape)}, expected {list(want)} "
                    f"(r={r} from {ADAPTER_CONFIG_NAME}, layer {in_dim}->{out_dim})"
                )

    to_wrap = [n for n in found if not isinstance(model.get_submodule(n), LoRALinear)]
    apply_lora_to_modules(model, to_wrap, r, alpha, dropout, adapter_dtype=adapter_dtype, use_dora=use_dora)
    with torch.no_grad():
        for native, pair in found.items():
            layer = model.get_submodule(native)
            for which, owner, attr in (("A", layer.lora_a, "weight"), ("B", layer.lora_b, "weight"),
                                       ("M", layer, "lora_magnitude")):
                if which not in pair:
                    continue
                tensor, param = pair[which][1], getattr(owner, attr)
                if param.is_meta:  # copy_ into meta is a no-op: put a real tensor there
                    setattr(owner, attr, nn.Parameter(tensor.to(param.dtype), requires_grad=param.requires_grad))
                else:
                    param.copy_(tensor)
    return model
