"""HF safetensors checkpoints <-> native ``TransformerDecoder``: the one HF reader and writer.

Every place that reads or writes HF tensors goes through here: names (``hf_to_native_key`` /
``native_to_hf_key``), the skip rule (``native_weight_name``: rotary buffers, the head of a
tied model), shard index handling (``safetensors_files``, ``tensors_by_file``) and safe file
opening, for the dense load below, the NF4 load (``models.quantize``), adapters
(``models.adapters``), the GGUF writer (``models.gguf``) and FSDP's row-wise load
(``training.sharded_io``).

Loading builds the model on the meta device, reads tensors one at a time with safetensors'
``safe_open`` (memory-mapped), casts each to the target dtype/device and hands the result to
``load_state_dict(assign=True)``: peak host memory stays about one copy of the weights, and no
pickle is ever executed. Saving writes what ``transformers.LlamaForCausalLM.from_pretrained``
reads: config.json, ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards plus
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tunelab.errors import CheckpointError
from tunelab.models.hf_config import ARCHITECTURES, args_from_hf_config, hf_config_from_args
from tunelab.models.llama.args import ModelArgs
from tunelab.models.llama.builders import build_model
from tunelab.models.mxfp4 import expert_tensor_from_mxfp4, is_mxfp4, mxfp4_part
from tunelab.modules.transformer import TransformerDecoder
from tunelab.run_layout import merged_models

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Copied verbatim from source_dir by save_pretrained (whichever exist).
AUX_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "original/tokenizer.model",
)

# (native regex, HF template) and the reverse; {i} is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.qkv_proj.weight": "self_attn.qkv_proj.weight",  # phi3: [q; k; v] rows
    "mlp.gate_up_proj.weight": "mlp.gate_up_proj.weight",  # phi3: [gate; up] rows
    "attn.q_proj.bias": "self_attn.q_proj.bias",  # qwen2
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.gate.weight": "mlp.gate.weight",  # an MoE layer's router
    # gpt-oss: biased output projection, sinks, a biased router, experts stored stacked
    "attn.o_proj.bias": "self_attn.o_proj.bias",
    "attn.sinks": "self_attn.sinks",
    "mlp.router.weight": "mlp.router.weight",
    "mlp.router.bias": "mlp.router.bias",
    "mlp.experts.gate_up_proj": "mlp.experts.gate_up_proj",
    "mlp.experts.gate_up_proj_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.experts.down_proj": "mlp.experts.down_proj",
    "mlp.experts.down_proj_bias": "mlp.experts.down_proj_bias",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Gemma's four norms per layer: its post_attention_layernorm is the norm AFTER attention (in
# Llama it is the one before the MLP).
_SANDWICH_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_post_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "mlp_post_norm.weight": "post_feedforward_layernorm.weight",
}
NATIVE_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_NATIVE_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_NATIVE_SANDWICH = {v: k for k, v in _SANDWICH_LAYER_NAMES.items()}
_HF_TO_NATIVE_TOP = {v: k for k, v in _TOP_NAMES.items()}
# Where an image-text checkpoint (Gemma3ForConditionalGeneration) keeps its language model
MULTIMODAL_PREFIX = "language_model."
# MoE experts: per expert on disk (gate_proj, up_proj, down_proj), stacked natively as
# transformers holds them in memory: gate_up_proj [E, 2I, dim] (gate rows, then up), down_proj
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_NATIVE_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")


def expert_slot(hf_name: str) -> tuple[str, int, int] | None:
    """``model.layers.3.mlp.experts.7.up_proj.weight`` -> (``layers.3.mlp.experts.gate_up_proj``,
    7, 1): the stacked native tensor an expert's weight goes into, the expert, and which half of
    its rows (0 gate, 1 up; 0 for down_proj); None for other names."""
    m = _HF_EXPERT.match(hf_name)
    if m is None:
        return None
    which = m.group(3)
    stacked = "down_proj" if which == "down" else "gate_up_proj"
    return f"layers.{m.group(1)}.mlp.experts.{stacked}", int(m.group(2)), int(which == "up")


def expert_halves(stacked_name: str) -> int:
    """How many per-expert checkpoint tensors make one expert's row of a stacked tensor: 2 for
    ``gate_up_proj`` (gate, up), 1 for ``down_proj``."""
    return 1 if stacked_name.endswith("down_proj") else 2


def stacked_expert_shape(stacked_name: str, piece_shape, n_experts: int) -> tuple[int, int, int]:
    """The shape of a stacked expert tensor from the shape of one of its per-expert pieces."""
    return n_experts, piece_shape[0] * expert_halves(stacked_name), piece_shape[1]


def stack_experts(stacked_name: str, n_experts: int, piece) -> torch.Tensor:
    """The stacked [E, rows, cols] tensor from ``piece(expert, half)``, each expert's halves
    (gate, up) concatenated along the rows."""
    halves = expert_halves(stacked_name)
    return torch.stack([torch.cat([piece(e, h) for h in range(halves)]) for e in range(n_experts)])


def per_expert_tensors(native_name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A stacked native expert tensor as the checkpoint's per-expert tensors (views), or None
    for other names."""
    m = _NATIVE_EXPERTS.match(native_name)
    if m is None:
        return None
    prefix = f"model.layers.{m.group(1)}.mlp.experts"
    if m.group(2) == "down":
        return {f"{prefix}.{e}.down_proj.weight": w for e, w in enumerate(tensor.unbind(0))}
    out = {}
    for e, w in enumerate(tensor.unbind(0)):
        out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = w.chunk(2, dim=0)
    return out
# Old transformers versions saved this computed buffer; it is recomputed, never loaded.
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def rename_weight(name: str, top: dict[str, str], layer_pattern: re.Pattern, layer_names: dict[str, str],
                  layer_prefix: str, what: str) -> str:
    """One naming scheme to another: ``top`` maps the whole names outside the layers; a
    ``layer_pattern`` match (groups: layer index, rest) maps the rest by ``layer_names`` under
    ``layer_prefix`` + index.

    Raises:
        KeyError: ``name`` is neither (the message says it is not ``what``).
    """
    if name in top:
        return top[name]
    m = layer_pattern.match(name)
    if m and m.group(2) in layer_names:
        return f"{layer_prefix}{m.group(1)}.{layer_names[m.group(2)]}"
    raise KeyError(f"{name!r} is not {what}")


def native_to_hf_key(name: str, args: ModelArgs | None = None) -> str:
    """``layers.0.attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj.weight``.

    Args:
        name: a native weight name.
        args: the architecture, where the family names its weights differently: Gemma's four
            norms per layer (``sandwich_norm``), the ``language_model.`` prefix of an
            image-text checkpoint (``multimodal``). None: Llama's names.

    Raises:
        KeyError: the name is not a native weight (e.g. a LoRA adapter weight).
    """
    experts = _NATIVE_EXPERTS.match(name) if args is None or args.swiglu_limit is None else None
    if experts:  # a stacked tensor of a per-expert checkpoint: named by its per-expert pattern
        which = "down" if experts.group(2) == "down" else "{gate,up}"
        return f"model.layers.{experts.group(1)}.mlp.experts.*.{which}_proj.weight"
    layer = _SANDWICH_LAYER_NAMES if args is not None and args.sandwich_norm else _LAYER_NAMES
    hf = rename_weight(name, _TOP_NAMES, NATIVE_LAYER, layer, "model.layers.", "a native weight name")
    return MULTIMODAL_PREFIX + hf if args is not None and args.multimodal else hf


def hf_to_native_key(name: str, args: ModelArgs | None = None) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``layers.0.attn.q_proj.weight``.

    Args:
        name: an HF tensor name.
        args: as in :func:`native_to_hf_key` (an image-text checkpoint's text weights may also
            be spelled ``model.language_model.*``, as transformers 5 names them in memory).

    Raises:
        KeyError: the name is not an HF weight of the family.
    """
    if args is not None and args.multimodal:
        if name.startswith("model.language_model."):
            name = "model." + name.removeprefix("model.language_model.")
        elif name.startswith(MULTIMODAL_PREFIX):
            name = name.removeprefix(MULTIMODAL_PREFIX)
        elif name != "lm_head.weight":
            raise KeyError(f"{name!r} is not a weight of the language model")
    layer = _HF_TO_NATIVE_SANDWICH if args is not None and args.sandwich_norm else _HF_TO_NATIVE_LAYER
    return rename_weight(name, _HF_TO_NATIVE_TOP, _HF_LAYER, layer, "layers.", "an HF weight name")


def is_language_model_tensor(hf_name: str, args: ModelArgs) -> bool:
    """False for the tensors of an image-text checkpoint outside its language model (vision
    tower, projector): tunelab neither loads nor changes them, and carries them into merged
    exports as they are."""
    return not args.multimodal or hf_name.startswith((MULTIMODAL_PREFIX, "model.language_model.", "lm_head.",
                                                      "language_model.lm_head."))


# ---------------------------------------------------------------------------- reading
def native_weight_name(hf_name: str, args: ModelArgs, where) -> str | None:
    """The native name an HF checkpoint tensor loads into, or None for a tensor every reader
    skips: the rotary ``inv_freq`` buffer old transformers versions saved (recomputed, never
    loaded), ``lm_head.weight`` of a model with tied embeddings (the head is the embedding) and
    an image-text checkpoint's vision tensors (:func:`is_language_model_tensor`).

    The one rule for reading HF weights: the dense, quantized, sharded and GGUF readers all
    ask it.

    Args:
        hf_name: the tensor's name in the safetensors file.
        args: the architecture (tied embeddings, the family's layer names).
        where: the checkpoint folder, for the error.

    Raises:
        CheckpointError: a name that is not a weight of the family.
    """
    if (_IGNORED_HF.match(hf_name) or not is_language_model_tensor(hf_name, args)
            or (args.tie_word_embeddings and hf_name.endswith("lm_head.weight"))):
        return None
    try:
        return hf_to_native_key(hf_name, args)
    except KeyError:
        arch = ARCHITECTURES.get(args.model_type, "LlamaForCausalLM")
        raise CheckpointError(f"{where}: unexpected tensor {hf_name!r}; not a plain {arch} checkpoint") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def checkpoint_folder(checkpoint_dir) -> Path:
    """``checkpoint_dir`` as a Path to an existing folder, or a one-line CheckpointError."""
    path = Path(checkpoint_dir).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint_dir {str(path)!r} does not exist; download one with `tune download REPO_ID --output-dir DIR`"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint_dir {str(path)!r} is a file; pass the folder that holds config.json")
    return path


def check_checkpoint_dir(checkpoint_dir) -> Path:
    """The model folder ``checkpoint_dir`` as a Path, or a one-line CheckpointError saying what
    it is instead (missing, a file, a PEFT adapter folder, a run's output_dir) and what to pass.
    """
    path = checkpoint_folder(checkpoint_dir)
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        try:  # PEFT records the base model it was trained on
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        hint = (f"it is a PEFT adapter folder: pass its base model ({base or 'the one it was trained on'}) "
                "as checkpoint_dir and this folder as adapter_dir where the command takes one, or the "
                "step's merged/ folder")
    elif merged := merged_models(path):
        hint = f"it looks like a run's output_dir: pass one of its merged models, e.g. {merged[-1]}"
    else:
        hint = "a HF checkpoint folder needs one; download one with `tune download REPO_ID --output-dir DIR`"
    raise CheckpointError(f"checkpoint_dir {str(path)!r} has no config.json: {hint}")


def read_hf_config(checkpoint_dir) -> dict:
    """Parse ``checkpoint_dir/config.json``, with a one-line CheckpointError on any problem."""
    path = check_checkpoint_dir(checkpoint_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({_one_line(e)}); re-download it") from None


def safetensors_files(checkpoint_dir) -> dict[str, Path]:
    """Map each HF tensor name to the safetensors file that holds it.

    Reads ``model.safetensors`` or the ``weight_map`` of ``model.safetensors.index.json``.
    """
    path = checkpoint_folder(checkpoint_dir)
    single = path / SINGLE_FILE
    index = path / INDEX_FILE
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} has no readable weight_map ({_one_line(e)}); re-download it") from None
        files = {}
        for name, shard in weight_map.items():
            shard_path = path / shard if isinstance(shard, str) else None
            if shard_path is None or not shard_path.resolve().is_relative_to(path.resolve()):
                raise CheckpointError(f"{index} maps {name!r} to {shard!r}, which is not a file inside {path}; "
                                      "re-download the checkpoint")
            if not shard_path.is_file():
                raise CheckpointError(
                    f"{shard_path} is listed in {INDEX_FILE} but missing; re-download the checkpoint"
                )
            files[name] = shard_path
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pth")) or list(path.glob("original/*.pth")):
        raise CheckpointError(
            f"{path} holds only .bin/.pth weights, which tunelab does not load (pickle); convert them to "
            "safetensors (e.g. re-download the safetensors files, or save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; download the safetensors weights "
        "(.bin is unsupported: convert to safetensors)"
    )


def tensors_by_file(checkpoint_dir) -> dict[Path, list[str]]:
    """The HF tensor names of a checkpoint grouped by the safetensors file that holds them, in
    file order (readers open one file at a time)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in safetensors_files(checkpoint_dir).items():
        by_file.setdefault(file, []).append(name)
    return by_file


def open_safetensors(file: Path):
    """``safe_open`` on the CPU with a one-line CheckpointError for a corrupt file (a context
    manager; ``get_tensor`` / ``get_slice`` read single tensors)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) on a bad header
        raise CheckpointError(f"{file} is not a valid safetensors file ({_one_line(e)}); re-download it") from None


def _tensor_names(file: Path) -> list[str]:
    with open_safetensors(file) as f:
        return list(f.keys())


def iter_hf_tensors(checkpoint_dir):
    """Yield (hf_name, tensor) file by file, one tensor in memory at a time.

    MXFP4 expert weights (gpt-oss on the Hub: ``X_blocks`` + ``X_scales``) come out as the one
    dense tensor ``X`` a bf16 checkpoint holds, once both halves have been read
    (``models.mxfp4``), so every reader sees the dense layout.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 halves until the pair is whole
    for name, tensor in _iter_stored_tensors(checkpoint_dir):
        part = mxfp4_part(name)
        if part is None:
            yield name, tensor
            continue
        base, which = part
        pair = pending.setdefault(base, {})
        pair[which] = tensor
        if len(pair) == 2:
            yield base, expert_tensor_from_mxfp4(pending.pop(base), base, torch.bfloat16, checkpoint_dir)
    if pending:
        base, pair = next(iter(pending.items()))
        missing = "scales" if "blocks" in pair else "blocks"
        raise CheckpointError(f"{checkpoint_dir}: {base}_{next(iter(pair))} has no {base}_{missing}; "
                              "re-download the checkpoint")


def _iter_stored_tensors(checkpoint_dir):
    for file, names in tensors_by_file(checkpoint_dir).items():
        with open_safetensors(file) as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(
                        f"{file} lacks tensor {name!r} that {INDEX_FILE} puts there; re-download the checkpoint"
                    )
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(
                        f"{file}: cannot read tensor {name!r} ({_one_line(e)}); re-download it"
                    ) from None
                yield name, tensor


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def load_hf_state_dict(
    checkpoint_dir,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    *,
    args: ModelArgs | None = None,
) -> dict[str, torch.Tensor]:
    """Read an HF checkpoint's weights with native names.

    Args:
        checkpoint_dir: HF folder (``model.safetensors`` or sharded with an index).
        dtype: cast floating tensors to it (None keeps the stored dtype).
        device: where to put the tensors (cast tensor by tensor).
        args: the architecture (default: from config.json): its names, and with tied
            embeddings ``lm_head.weight`` is dropped.

    Raises:
        CheckpointError: missing files, corrupt safetensors, or a tensor name that is not a
            weight of the family.
    """
    if args is None:
        args = args_from_hf_config(read_hf_config(checkpoint_dir))
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, int], torch.Tensor]] = {}  # stacked name -> (expert, half) -> weight
    for hf_name, tensor in iter_hf_tensors(checkpoint_dir):
        slot = expert_slot(hf_name) if args.n_experts else None
        if slot is not None:
            experts.setdefault(slot[0], {})[slot[1:]] = _cast(tensor, dtype, device)
            continue
        name = native_weight_name(hf_name, args, checkpoint_dir)
        if name is None:
            continue
        out[name] = _cast(tensor, dtype, device)
        del tensor
    for name, pieces in experts.items():
        halves = expert_halves(name)
        want = [(e, h) for e in range(args.n_experts) for h in range(halves)]
        missing = [e for e, h in want if (e, h) not in pieces]
        if missing:
            raise CheckpointError(f"{checkpoint_dir}: {name} lacks expert tensors {sorted(set(missing))[:5]} of "
                                  f"{args.n_experts}; the weights do not match config.json")
        out[name] = stack_experts(name, args.n_experts, lambda e, h, pieces=pieces: pieces.pop((e, h)))
    return out


def from_pretrained(
    checkpoint_dir,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
) -> TransformerDecoder:
    """Load an HF Llama checkpoint folder as a native ``TransformerDecoder`` (eval mode).

    The architecture comes from ``config.json``; weights are read tensor by tensor from the
    safetensors files into a meta-built model (no random init, ~1x host memory).

    Args:
        checkpoint_dir: HF folder with config.json and safetensors weights.
        dtype: parameter dtype (floating tensors are cast on load).
        device: parameter device.
        quantize: ``"nf4"`` stores the decoder-block projections in 4-bit NF4 (QLoRA),
            quantized tensor by tensor while loading (``tunelab.models.quantize``). A
            pre-quantized bitsandbytes nf4 checkpoint loads either way (dequantized when None);
            so does gpt-oss's MXFP4 (dequantized, then NF4 with ``"nf4"``).

    Raises:
        CheckpointError: the folder, config or weights are missing, corrupt, unsupported or do
            not match the config (names and shapes are checked).
    """
    path = checkpoint_folder(checkpoint_dir)
    config = read_hf_config(path)
    if quantize is not None or ("quantization_config" in config and not is_mxfp4(config)):
        from tunelab.models.quantize import from_pretrained_quantized  # imports modules.nf4

        return from_pretrained_quantized(path, dtype=dtype, device=device, quantize=quantize)
    args = args_from_hf_config(config)
    model = build_model(args, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict = load_hf_state_dict(path, dtype=dtype, device=device, args=args)
    check_state_dict(state_dict, expected, path, args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Computed buffers were built on meta; rebuild them where the weights now live.
    model.reset_rope(device)
    return model.eval()


def check_state_dict(state_dict: dict, expected: dict[str, tuple], where, args: ModelArgs | None = None) -> None:
    """Every expected native name present with its shape and nothing else, or a one-line
    CheckpointError in HF names (``where``: the checkpoint, for the message; ``args``: the
    family's names, as in :func:`native_to_hf_key`)."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        hf = [native_to_hf_key(k, args) for k in missing]
        more = f" (+{len(hf) - 3} more)" if len(hf) > 3 else ""
        raise CheckpointError(
            f"{where}: missing tensors {', '.join(hf[:3])}{more}; the weights do not match config.json"
        )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        hf = [native_to_hf_key(k, args) for k in unexpected]
        more = f" (+{len(hf) - 3} more)" if len(hf) > 3 else ""
        raise CheckpointError(
            f"{where}: unexpected tensors {', '.join(hf[:3])}{more}; the weights do not match config.json"
        )
    for k, shape in expected.items():
        got = tuple(state_dict[k].shape)
        if got != shape:
            raise CheckpointError(
                f"{where}: tensor {native_to_hf_key(k, args)!r} has shape {list(got)}, config.json expects "
                f"{list(shape)}; the weights do not match config.json"
            )


# ---------------------------------------------------------------------------- writing
def _plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy split in order: a shard closes when the next tensor would overflow it."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def save_pretrained(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    out_dir,
    source_dir=None,
    max_shard_size: int = 5 * 10**9,
    args: ModelArgs | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an HF Llama folder that ``transformers`` (and ``from_pretrained``) loads.

    Args:
        model_or_state_dict: a ``TransformerDecoder`` or a native state dict (merge LoRA
            first, e.g. with ``merge_lora_state_dict``).
        out_dir: folder to write (created; earlier weight files in it are replaced).
        source_dir: checkpoint the model came from: its config.json extras are kept and its
            tokenizer / generation files are copied.
        max_shard_size: bytes per safetensors file; one file -> ``model.safetensors``.
        args: the architecture (default: ``model.args``, else source_dir's config.json).
        dtype: cast floating tensors before writing (default: as they are).

    Returns:
        The output folder.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
        if args is None:
            args = getattr(model_or_state_dict, "args", None)
    else:
        state_dict = dict(model_or_state_dict)
    source_config = read_hf_config(source_dir) if source_dir is not None else None
    if args is None:
        if source_config is None:
            raise CheckpointError("save_pretrained needs args= or source_dir= to write config.json")
        args = args_from_hf_config(source_config)

    lora = [k for k in state_dict if ".lora_" in k]
    if lora:
        raise CheckpointError(
            f"state dict holds LoRA weights ({lora[0]}); merge them first "
            "(tunelab.modules.peft.merge_lora_state_dict(model)) or save the adapter with save_adapter"
        )
    if args.tie_word_embeddings:
        state_dict.pop("output.weight", None)
    hf_state: dict[str, torch.Tensor] = {}
    carried: set[str] = set()  # written as they were read, never cast
    for name, tensor in state_dict.items():
        per_expert = per_expert_tensors(name, tensor) if args.n_experts and args.swiglu_limit is None else None
        if per_expert is not None:  # back to one tensor per expert, as checkpoints store them
            hf_state.update(per_expert)
            continue
        try:
            hf_state[native_to_hf_key(name, args)] = tensor
        except KeyError:
            raise CheckpointError(f"cannot save {name!r}: not a native weight name") from None
    if args.multimodal:  # the vision tower and projector, as they were
        if source_dir is None:
            raise CheckpointError("an image-text model is saved from the folder it was loaded from; pass source_dir")
        for hf_name, tensor in iter_hf_tensors(source_dir):
            if not is_language_model_tensor(hf_name, args):
                hf_state[hf_name] = tensor
                carried.add(hf_name)

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # A stale model.safetensors from an earlier save would shadow a new index (and vice versa).
    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        if old.is_file():
            old.unlink()

    def nbytes(k: str) -> int:
        t = hf_state[k]
        cast = dtype and t.is_floating_point() and k not in carried
        return t.numel() * (torch.empty((), dtype=dtype).element_size() if cast else t.element_size())

    shards = _plan_shards([(k, nbytes(k)) for k in hf_state], max_shard_size)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        fname = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # One shard in host memory at a time; clone() so no two names share storage.
        tensors = {k: _cast(hf_state[k].detach(), None if k in carried else dtype, "cpu").contiguous().clone()
                   for k in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: fname for k in names})
    if n > 1:
        total = sum(nbytes(k) for k in hf_state)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config = hf_config_from_args(args, source_config)
    config.pop("quantization_config", None)  # the weights written here are always dense
    saved_dtype = dtype or next((t.dtype for k, t in hf_state.items() if t.is_floating_point() and k not in carried),
                                None)
    if saved_dtype is not None:
        dtype_name = str(saved_dtype).removeprefix("torch.")
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        config["dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    if source_dir is not None:
        src = Path(source_dir)
        for rel in AUX_FILES:
            if (src / rel).is_file() and (src / rel).resolve() != (out / rel).resolve():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, out / rel)
    return out
