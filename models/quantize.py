"""Loading HF Llama checkpoints with NF4 (QLoRA) decoder weights.

Two sources:

- a dense checkpoint with ``quantize="nf4"``: tensors are read one at a time (safetensors,
  memory-mapped), cast to the model dtype on the target device, and each decoder-block
  projection (``q/k/v/o_proj``, ``gate/up/down_proj``) is quantized right there and its dense
  copy dropped. Device memory therefore peaks at the NF4 model plus one dense weight, never the
  whole bf16 model (an 8B model loads in ~6 GB). Embeddings, norms and the LM head stay dense,
  as in QLoRA.
- a pre-quantized bitsandbytes 4-bit checkpoint (config.json ``quantization_config`` with
  ``load_in_4bit`` and ``bnb_4bit_quant_type: nf4``, as ``transformers`` writes it): the packed
  codes and scales (``.weight``, ``.absmax``, ``.quant_map``, ``.nested_absmax``,
  ``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``) become ``NF4Weight`` storage as they
  are, with no re-quantization. With ``quantize=None`` they are dequantized into a dense model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import CheckpointError, ConfigError
from tunelab.models.checkpoint import (
    checkpoint_folder,
    check_state_dict,
    expert_halves,
    expert_slot,
    iter_hf_tensors,
    native_weight_name,
    open_safetensors,
    read_hf_config,
    stacked_expert_shape,
    tensors_by_file,
)
from tunelab.models.hf_config import args_from_hf_config
from tunelab.models.llama.builders import build_model
from tunelab.models.mxfp4 import dense_shape, is_mxfp4, mxfp4_part
from tunelab.modules.nf4 import (
    NF4ExpertWeights,
    NF4Linear,
    NF4Weight,
    dynamic_code,
    nf4_code,
    quantize_linears_,
    to_nf4,
)
from tunelab.modules.transformer import TransformerDecoder

__all__ = ["QUANTIZE_METHODS", "from_pretrained_quantized", "bnb_4bit_settings", "quantize_model_", "is_decoder_linear"]

QUANTIZE_METHODS = ("nf4",)
_DECODER_LINEAR = re.compile(r"^layers\.\d+\.(attn\.(qkv|[qkvo])_proj|mlp\.(gate_up|gate|up|down)_proj)\.weight$")
_STACKED_EXPERTS = re.compile(r"^layers\.\d+\.mlp\.experts\.(gate_up|down)_proj$")  # stored stacked (gpt-oss)
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
_BNB_SUFFIX = re.compile(r"^(?P<weight>.+\.weight)\.(?P<part>absmax|quant_map|nested_absmax|nested_quant_map|"
                         r"quant_state\.bitsandbytes__\w+)$")


def is_decoder_linear(native_name: str) -> bool:
    """True for ``layers.{i}.attn.{q,k,v,o,qkv}_proj.weight`` and
    ``layers.{i}.mlp.{gate,up,down,gate_up}_proj.weight``."""
    return _DECODER_LINEAR.match(native_name) is not None


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise ConfigError(f"quantize: {quantize!r} is not supported; use nf4 (QLoRA) or null")


def bnb_4bit_settings(config: dict, where) -> dict | None:
    """The bitsandbytes settings of a pre-quantized checkpoint's config.json (None if dense).

    Raises:
        CheckpointError: a quantization tunelab does not read (8-bit, fp4, single quantization,
            non-uint8 storage, another method such as GPTQ/AWQ).
    """
    q = config.get("quantization_config")
    if q is None or is_mxfp4(config):  # gpt-oss's MXFP4 experts: dequantized as they are read
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: config.json quantization_config is not a dict; re-download the checkpoint")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise CheckpointError(f"{where}: {method} quantized checkpoints are not supported; use the unquantized "
                              "checkpoint (with quantize: nf4 for QLoRA) or a bitsandbytes nf4 one")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise CheckpointError(f"{where}: bitsandbytes 8-bit checkpoints are not supported; use the unquantized "
                              "checkpoint with quantize: nf4 (or a 4-bit nf4 checkpoint)")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise CheckpointError(f"{where}: quantization_config is neither 4-bit nor 8-bit; not a bitsandbytes checkpoint tunelab reads")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{where}: 4-bit type {q.get('bnb_4bit_quant_type', 'fp4')!r} is not supported, only nf4; "
                              "use an nf4 checkpoint or the unquantized one with quantize: nf4")
    if not q.get("bnb_4bit_use_double_quant", False):
        raise CheckpointError(f"{where}: nf4 without double quantization (bnb_4bit_use_double_quant: false) is not "
                              "supported; use the unquantized checkpoint with quantize: nf4")
    if q.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise CheckpointError(f"{where}: bnb_4bit_quant_storage {q['bnb_4bit_quant_storage']!r} is not supported, only uint8")
    return q


@torch.no_grad()
def quantize_model_(model: TransformerDecoder) -> TransformerDecoder:
    """Quantize the decoder-block projections of an in-memory model to NF4 (layer by layer).

    Plain ``nn.Linear`` becomes ``NF4Linear``, ``LoRALinear`` becomes ``NF4LoRALinear``;
    embeddings, norms and the LM head stay as they are.
    """
    for layer in model.layers:
        quantize_linears_(layer, skip=())
    return model


# ---------------------------------------------------------------------------- loading
def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.Parameter(tensor))  # requires_grad as load_state_dict's


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name``; a Parameter there (a stacked expert tensor) gives way to it."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    if leaf in owner._parameters:
        delattr(owner, leaf)
    setattr(owner, leaf, module)


def _quantized_module(model: nn.Module, weight_name: str, weight) -> None:
    """Put an NF4Linear holding ``weight`` where the linear layer of ``weight_name`` is, keeping
    that layer's bias Parameter (loaded already or still meta: it loads by name later)."""
    name = weight_name.removesuffix(".weight")
    _set_module(model, name, NF4Linear(weight, model.get_submodule(name).bias))


class _ExpertLoader:
    """Per-expert checkpoint tensors into an MoE model being loaded: with ``quantize="nf4"``
    each expert's weight is quantized as soon as it is whole (gate and up halves together) and
    the stack becomes an ``NF4ExpertWeights``; otherwise the dense stack is assembled."""

    def __init__(self, model: nn.Module, n_experts: int, quantize: str | None, dtype, device) -> None:
        self.model, self.n, self.quantize, self.dtype, self.device = model, n_experts, quantize, dtype, device
        self.halves: dict[tuple[str, int], dict[int, torch.Tensor]] = {}  # (stacked, expert) -> half -> tensor
        self.done: dict[str, dict[int, object]] = {}  # stacked -> expert -> NF4Weight or dense tensor

    def add(self, slot: tuple[str, int, int], tensor: torch.Tensor) -> None:
        name, expert, half = slot
        parts = self.halves.setdefault((name, expert), {})
        parts[half] = tensor.to(device=self.device, dtype=self.dtype)
        if len(parts) < expert_halves(name):
            return
        weight = torch.cat([parts[h] for h in sorted(self.halves.pop((name, expert)))])
        self.done.setdefault(name, {})[expert] = to_nf4(weight) if self.quantize == "nf4" else weight

    def finish(self, where) -> None:
        for name, experts in self.done.items():
            if sorted(experts) != list(range(self.n)) or self.halves:
                raise CheckpointError(f"{where}: {name} lacks expert tensors; the weights do not match config.json")
            weights = [experts[e] for e in range(self.n)]
            if self.quantize == "nf4":  # the meta Parameter gives way to the quantized stack
                _set_module(self.model, name, NF4ExpertWeights(weights))
            else:
                _set_param(self.model, name, torch.stack(weights))


def _read_quant_state(tensor: torch.Tensor, hf_name: str, where) -> dict:
    try:
        state = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
        return dict(state)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {hf_name} is not readable bitsandbytes quant state ({e}); re-download it") from None


def _hf_shapes(path: Path, bnb: dict | None) -> dict[str, tuple[int, ...]]:
    """HF weight name -> shape, from the safetensors headers (quantized weights: their quant state)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in tensors_by_file(path).items():
        with open_safetensors(file) as f:
            for name in names:
                m = _BNB_SUFFIX.match(name) if bnb is not None else None
                mxfp4 = mxfp4_part(name)
                if mxfp4 is not None:  # the blocks give the dense stack's shape
                    if mxfp4[1] == "blocks":
                        shapes[mxfp4[0]] = dense_shape(f.get_slice(name).get_shape())
                elif m is None:
                    shapes.setdefault(name, tuple(f.get_slice(name).get_shape()))
                elif m.group("part").startswith("quant_state."):
                    if not m.group("part").endswith("__nf4"):
                        raise CheckpointError(f"{path}: {name} is not nf4 ({m.group('part')}); only nf4 checkpoints load")
                    shapes[m.group("weight")] = tuple(_read_quant_state(f.get_tensor(name), name, path)["shape"])
    return shapes


def _nf4_from_bnb(parts: dict[str, torch.Tensor], hf_name: str, dtype: torch.dtype, device, where) -> NF4Weight:
    missing = [p for p in ("weight", *_BNB_PARTS) if p not in parts]
    if missing:
        raise CheckpointError(f"{where}: {hf_name} lacks {', '.join(missing)} of its bitsandbytes nf4 state; re-download it")
    state = _read_quant_state(parts["quant_state.bitsandbytes__nf4"], hf_name, where)
    if state.get("quant_type") != "nf4" or "nested_offset" not in state:
        raise CheckpointError(f"{where}: {hf_name} quant state is {state.get('quant_type')!r} without double "
                              "quantization; only double-quantized nf4 is supported")
    code = parts["quant_map"].float()
    absmax_code = parts["nested_quant_map"].float()
    try:
        weight = NF4Weight(
            parts["weight"].reshape(-1),
            parts["absmax"].reshape(-1),
            parts["nested_absmax"].reshape(-1).float(),
            torch.tensor([state["nested_offset"]], dtype=torch.float32),
            state["shape"],
            dtype,
            int(state["blocksize"]),
            int(state.get("nested_blocksize", 256)),
            # share the standard tables unless the checkpoint brings different ones
            code=None if torch.equal(code, nf4_code()) else code,
            absmax_code=None if torch.equal(absmax_code, dynamic_code()) else absmax_code,
        )
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: {hf_name} has inconsistent bitsandbytes nf4 tensors ({e}); re-download it") from None
    return weight.to(device)


@torch.no_grad()
def from_pretrained_quantized(
    checkpoint_dir,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantize: str | None = "nf4",
) -> TransformerDecoder:
    """Load an HF Llama folder with NF4 decoder projections (``NF4Linear``), tensor by tensor.

    Use it through ``tunelab.models.from_pretrained(..., quantize="nf4")``; pre-quantized
    bitsandbytes checkpoints are recognised from config.json whatever ``quantize`` says.

    Args:
        checkpoint_dir: HF folder (dense safetensors, or bitsandbytes 4-bit nf4).
        dtype: dtype of the dense tensors (embeddings, norms, head) and of the NF4 weights'
            dequantized values.
        device: where everything lives; quantization happens there.
        quantize: ``"nf4"`` keeps the decoder projections 4-bit; ``None`` (only meaningful for
            a pre-quantized checkpoint) dequantizes them into a dense model.

    Raises:
        CheckpointError: missing/corrupt files, names or shapes that do not match config.json,
            or an unsupported quantization (8-bit, fp4, ...).
        ConfigError: an unknown ``quantize`` value.
    """
    check_quantize(quantize)
    path = checkpoint_folder(checkpoint_dir)
    config = read_hf_config(path)
    bnb = bnb_4bit_settings(config, path)
    args = args_from_hf_config(config)
    if args.n_experts and bnb is not None:
        raise CheckpointError(f"{path}: bitsandbytes-quantized checkpoints of mixture-of-experts models "
                              f"({args.model_type}) are not supported; use the unquantized checkpoint (with "
                              "quantize: nf4 for QLoRA)")
    device = torch.device(device)
    model = build_model(args, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # names and shapes first (headers only), so a mismatch fails before any real work
    shapes = {}
    for hf_name, shape in _hf_shapes(path, bnb).items():
        slot = expert_slot(hf_name) if args.n_experts else None
        if slot is not None:  # per-expert tensors: the stacked shape
            shapes[slot[0]] = torch.empty(stacked_expert_shape(slot[0], shape, args.n_experts), device="meta")
            continue
        name = native_weight_name(hf_name, args, path)
        if name is not None:
            shapes[name] = torch.empty(shape, device="meta")
    check_state_dict(shapes, expected, path, args)

    experts = _ExpertLoader(model, args.n_experts, quantize, dtype, device)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # bnb pieces of a weight until all arrived
    for hf_name, tensor in iter_hf_tensors(path):
        slot = expert_slot(hf_name) if args.n_experts else None
        if slot is not None:
            experts.add(slot, tensor)
            continue
        m = _BNB_SUFFIX.match(hf_name) if bnb is not None else None
        base_name = m.group("weight") if m else hf_name
        name = native_weight_name(base_name, args, path)
        if name is None:
            continue
        if bnb is not None and (m is not None or tensor.dtype == torch.uint8):
            parts = pending.setdefault(base_name, {})
            parts[m.group("part") if m else "weight"] = tensor
            if len(parts) < 1 + len(_BNB_PARTS):
                continue
            weight = _nf4_from_bnb(pending.pop(base_name), base_name, dtype, device, path)
            if quantize == "nf4" and is_decoder_linear(name):
                _quantized_module(model, name, weight)
            else:
                _set_param(model, name, weight.dequantize(dtype))
        elif quantize == "nf4" and is_decoder_linear(name):
            _quantized_module(model, name, to_nf4(tensor.to(device=device, dtype=dtype)))
        elif quantize == "nf4" and _STACKED_EXPERTS.match(name):  # gpt-oss: [E, in, out], one expert at a time
            weights = [to_nf4(w.t().to(device=device, dtype=dtype)) for w in tensor.unbind(0)]
            _set_module(model, name, NF4ExpertWeights(weights, transposed=True))
        else:
            _set_param(model, name, tensor.to(device=device, dtype=dtype))
        del tensor
    if pending:
        first = next(iter(pending))
        raise CheckpointError(f"{path}: {first} lacks parts of its bitsandbytes nf4 state "
                              f"({', '.join(sorted(pending[first]))} found); re-download it")
    experts.finish(path)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: no weights for {', '.join(left[:3])}; the weights do not match config.json")
    model.reset_rope(device)
    return model.eval()
