"""HF Llama checkpoint (+ optional PEFT adapter) -> one GGUF file for llama.cpp / Ollama.

Streaming: the tensor plan (names, shapes, types, byte sizes) comes from the safetensors
headers alone, so the GGUF header is written before any weight is read. Then each tensor is
read (memory-mapped), merged with its LoRA pair in fp32, permuted, encoded and written, and
dropped before the next one: peak host memory is about one fp32 tensor plus its encoding
(the embedding of an 8B model, ~2 GB), never the model.

What llama.cpp expects of a ``llama`` file, and how it is met here:

* Names: ``token_embd``, ``blk.{i}.attn_{norm,q,k,v,output}``, ``blk.{i}.ffn_{norm,gate,up,
  down}``, ``output_norm``, ``output`` (absent when embeddings are tied: llama.cpp reuses
  ``token_embd``), all ``.weight``.
* RoPE: llama.cpp rotates interleaved pairs ``(x[2i], x[2i+1])``; HF checkpoints are stored
  for the rotate-half layout ``(x[i], x[i + d/2])``. Each head's q/k rows are therefore
  reordered so row ``2i`` holds HF row ``i`` and row ``2i+1`` holds HF row ``i + d/2``
  (Meta's original order, which HF permuted away when converting).
* Llama 3.1 rope scaling is not metadata: llama.cpp divides each rotary frequency by the
  matching entry of a ``rope_freqs.weight`` F32 tensor [head_dim / 2] (1 for high
  frequencies, ``factor`` for low ones, blended in between).
* Norms and other 1-D tensors stay F32 in every type, as llama.cpp's converter does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import CheckpointError, ConfigError
from tunelab.models.checkpoint import (
    NATIVE_LAYER,
    checkpoint_folder,
    check_state_dict,
    expert_slot,
    native_weight_name,
    open_safetensors,
    read_hf_config,
    rename_weight,
    safetensors_files,
    stack_experts,
    stacked_expert_shape,
)
from tunelab.models.hf_config import args_from_hf_config
from tunelab.models.llama.args import ModelArgs

__all__ = ["DTYPES", "write_gguf", "gguf_tensor_name", "permute_for_llama_cpp", "rope_freq_factors"]

# model_type -> llama.cpp architecture. Mistral is a llama file; qwen2 (q/k/v biases), qwen3 (q/k
# norms), gemma3 and phi3 (fused qkv / gate_up, kept fused) are their own, with rotate-half RoPE
# as in HF, so their q/k rows are not interleaved.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "phi3": "phi3", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss"}

#: Output types of ``export_gguf`` (llama.cpp's file-type names, lower case).
DTYPES = ("f16", "bf16", "q8_0", "q4_k_m")
_INSTALL_HINT = "pip install 'tunelab[gguf]'"

_LAYER_GGUF = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.qkv_proj.weight": "attn_qkv.weight",  # phi3: [q; k; v], as llama.cpp keeps it
    "attn.q_proj.bias": "attn_q.bias",  # qwen2
    "attn.k_proj.bias": "attn_k.bias",
    "attn.v_proj.bias": "attn_v.bias",
    "attn.o_proj.weight": "attn_output.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",  # qwen3
    "attn.k_norm.weight": "attn_k_norm.weight",
    "attn_post_norm.weight": "post_attention_norm.weight",  # gemma3
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp_post_norm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # phi3: [gate; up] in one, split by llama.cpp
    "mlp.gate.weight": "ffn_gate_inp.weight",  # an MoE layer's router
    # gpt-oss: biased output projection, sinks, a router with a bias
    "attn.o_proj.bias": "attn_output.bias",
    "attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}
# gpt-oss's llama.cpp names its pre-MLP norm (HF post_attention_layernorm) as HF does
_GPT_OSS_LAYER_GGUF = {**_LAYER_GGUF, "mlp_norm.weight": "post_attention_norm.weight"}
# an MoE layer's stacked experts as llama.cpp's [E, rows, cols] tensors: (native, half of dim 1)
_EXPERTS_GGUF = {"ffn_gate_exps.weight": ("mlp.experts.gate_up_proj", 0),
                 "ffn_up_exps.weight": ("mlp.experts.gate_up_proj", 1),
                 "ffn_down_exps.weight": ("mlp.experts.down_proj", None)}
# gpt-oss stores its experts input-major with gate and up interleaved (even / odd columns of
# gate_up_proj [E, dim, 2I]) and biased: (native, which interleaved half) per GGUF tensor
_GPT_OSS_EXPERTS_GGUF = {**_EXPERTS_GGUF,
                         "ffn_gate_exps.bias": ("mlp.experts.gate_up_proj_bias", 0),
                         "ffn_up_exps.bias": ("mlp.experts.gate_up_proj_bias", 1),
                         "ffn_down_exps.bias": ("mlp.experts.down_proj_bias", None)}
_TOP_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}


def gguf_tensor_name(native_name: str, model_type: str = "llama") -> str:
    """``layers.3.attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's names).

    Raises:
        KeyError: not a native Llama weight name.
    """
    layer = _GPT_OSS_LAYER_GGUF if model_type == "gpt_oss" else _LAYER_GGUF
    return rename_weight(native_name, _TOP_GGUF, NATIVE_LAYER, layer, "blk.", "a native Llama weight name")


def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from HF's rotate-half layout to llama.cpp's pairs.

    Args:
        weight: ``[n_heads * head_dim, in]`` q or k projection (HF layout).
        n_heads: heads in this projection (``n_kv_heads`` for k).

    Returns:
        The same shape; within each head, row ``2i`` = HF row ``i`` and row ``2i + 1`` =
        HF row ``i + head_dim / 2``.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    # (heads, 2 halves, half, in) -> (heads, half, 2, in): interleave the two halves
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_freq_factors(args: ModelArgs) -> torch.Tensor | None:
    """Llama 3.1 rope scaling as llama.cpp's ``rope_freqs`` tensor (None without scaling).

    Returns:
        fp32 ``[head_dim // 2]``: the divisor of each rotary frequency, i.e. plain
        ``theta ** (-2i / head_dim)`` over tunelab's scaled frequency.
    """
    if args.rope_scaling is None or args.rope_scaling["rope_type"] != "llama3":
        return None  # linear scaling is a metadata key (rope.scaling.type / factor)
    from tunelab.modules.rope import rope_inv_freq

    plain = rope_inv_freq(args.head_dim, args.rope_theta, None).double()
    scaled = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).double()
    return (plain / scaled).float()


# ---------------------------------------------------------------------------- the plan
@dataclass
class _Tensor:
    """One GGUF tensor: where its data comes from and how it is encoded."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy/torch order (rows, cols)
    native: str | None = None  # native weight it is read from (None: computed, e.g. rope_freqs)
    half: int | None = None  # stacked gate_up experts: which half of dim 1 (gate 0, up 1)
    qtype: object = None  # gguf.GGMLQuantizationType, filled in by _choose_types
    nbytes: int = 0


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"GGUF export needs the gguf package: {_INSTALL_HINT}") from None
    return gguf


def _check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
        raise ConfigError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return dtype.lower()


class _Source:
    """Reads native tensors from the checkpoint's safetensors files, one at a time, in fp32.

    Dense tensors are read by name; weights of a bitsandbytes nf4 checkpoint (QLoRA bases
    saved by transformers) are gathered from their parts and dequantized, as are gpt-oss's
    MXFP4 experts.
    """

    def __init__(self, path: Path, config: dict, args: ModelArgs) -> None:
        from tunelab.models.quantize import _BNB_SUFFIX, _hf_shapes, bnb_4bit_settings

        self.path = path
        self.bnb = bnb_4bit_settings(config, path)
        self.files = safetensors_files(path)
        self._handles: dict[Path, object] = {}
        # native name -> HF name, and the shape of every weight (from headers / quant state)
        self.hf_names: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.experts: dict[tuple[str, int, int], str] = {}  # (stacked, expert, half) -> HF name
        self.n_experts = args.n_experts
        for hf_name, shape in _hf_shapes(path, self.bnb).items():
            if self.bnb is not None and _BNB_SUFFIX.match(hf_name):
                continue  # a part of a quantized weight, read together with it
            slot = expert_slot(hf_name) if args.n_experts else None
            if slot is not None:  # one tensor per expert: read stacked, [E, rows, cols]
                self.experts[slot] = hf_name
                self.shapes[slot[0]] = stacked_expert_shape(slot[0], shape, args.n_experts)
                continue
            native = native_weight_name(hf_name, args, path)
            if native is None:
                continue
            self.hf_names[native] = hf_name
            self.shapes[native] = tuple(shape)

    def _get(self, hf_name: str) -> torch.Tensor:
        file = self.files.get(hf_name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {hf_name!r} is missing; re-download the checkpoint")
        if file not in self._handles:
            self._handles[file] = open_safetensors(file).__enter__()
        try:
            return self._handles[file].get_tensor(hf_name)
        except Exception as e:  # safetensors' own error type on a truncated file
            raise CheckpointError(f"{file}: cannot read {hf_name!r} ({e}); re-download it") from None

    def read(self, native: str) -> torch.Tensor:
        """The weight in fp32 (dequantized if the checkpoint stores it as bitsandbytes nf4;
        stacked [E, rows, cols] for an MoE layer's experts)."""
        if native not in self.hf_names:  # stacked experts
            return stack_experts(native, self.n_experts, lambda e, h: self._get(self.experts[(native, e, h)])).float()
        hf_name = self.hf_names[native]
        if hf_name not in self.files and f"{hf_name}_blocks" in self.files:  # gpt-oss's MXFP4 experts
            from tunelab.models.mxfp4 import expert_tensor_from_mxfp4

            pair = {part: self._get(f"{hf_name}_{part}") for part in ("blocks", "scales")}
            return expert_tensor_from_mxfp4(pair, hf_name, torch.float32, self.path)
        tensor = self._get(hf_name)
        if self.bnb is not None and tensor.dtype == torch.uint8:
            from tunelab.models.quantize import _BNB_PARTS, _nf4_from_bnb

            parts = {"weight": tensor}
            for part in _BNB_PARTS:
                parts[part] = self._get(f"{hf_name}.{part}")
            weight = _nf4_from_bnb(parts, hf_name, torch.float32, "cpu", self.path)
            return weight.dequantize(torch.float32)
        return tensor.float()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _lora_pairs(args: ModelArgs, adapter_dir) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``{native weight name: merge}`` from a PEFT adapter folder, ``merge(W0)`` being the
    fp32 merged weight ``W0 + (alpha / r) B A`` (DoRA: rows rescaled to the magnitudes; per
    expert for an MoE layer's stacked experts),
    the update ``LoRALinear.merged_weight`` / ``ExpertLoRA.merged`` compute.

    The adapter is loaded onto a meta-device model, so ``load_adapter`` checks it against the
    architecture (targets, shapes, unsupported LoRA variants) while only the small adapter
    tensors are materialised.
    """
    from tunelab.models.adapters import load_adapter
    from tunelab.models.llama.builders import build_model
    from tunelab.modules.peft.lora import expert_lora_modules, lora_modules, merged_lora_weight

    model = build_model(args, device="meta", dtype=torch.float32)
    load_adapter(model, adapter_dir, adapter_dtype=torch.float32)

    def linear(m):  # DoRA adapters carry their magnitude vector
        return lambda w: merged_lora_weight(w, m.lora_a.weight, m.lora_b.weight, float(m.scaling), m.lora_magnitude)

    merges = {f"{name}.weight": linear(m) for name, m in lora_modules(model)}
    for name, m in expert_lora_modules(model):  # layers.1.mlp.experts.gate_up_lora -> ...gate_up_proj
        merges[name.removesuffix("_lora") + "_proj"] = torch.no_grad()(m.merged)
    return merges


def _computed_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    """The fp32 tensors llama.cpp reads that no checkpoint holds: Llama 3.1's ``rope_freqs``
    and Phi-3's longrope divisors (``rope_factors_short`` / ``rope_factors_long``)."""
    out = {}
    factors = rope_freq_factors(args)
    if factors is not None:
        out["rope_freqs.weight"] = factors
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "longrope":
        for which in ("short", "long"):
            out[f"rope_factors_{which}.weight"] = torch.tensor(args.rope_scaling[f"{which}_factor"],
                                                               dtype=torch.float32)
    return out


def _plan(args: ModelArgs, source: _Source) -> list[_Tensor]:
    tensors = [_Tensor("token_embd.weight", source.shapes["tok_embeddings.weight"], "tok_embeddings.weight")]
    for name, values in _computed_tensors(args).items():
        tensors.append(_Tensor(name, tuple(values.shape)))
    gpt_oss = args.model_type == "gpt_oss"
    for i in range(args.n_layers):
        for native_leaf in _LAYER_GGUF:
            native = f"layers.{i}.{native_leaf}"
            if native not in source.shapes:
                continue  # a tensor of another family (checked against config.json before)
            tensors.append(_Tensor(gguf_tensor_name(native, args.model_type), source.shapes[native], native))
        if args.is_moe(i):
            for gguf_leaf, (native_leaf, half) in (_GPT_OSS_EXPERTS_GGUF if gpt_oss else _EXPERTS_GGUF).items():
                native = f"layers.{i}.{native_leaf}"
                shape = source.shapes[native]
                if gpt_oss and len(shape) == 3:  # [E, in, out] -> llama.cpp's [E, out, in]
                    shape = (shape[0], shape[2], shape[1])
                if half is not None:  # gate or up: half of the rows (of the bias's columns)
                    shape = (shape[0], shape[1] // 2, *shape[2:])
                tensors.append(_Tensor(f"blk.{i}.{gguf_leaf}", shape, native, half))
    tensors.append(_Tensor("output_norm.weight", source.shapes["norm.weight"], "norm.weight"))
    # tied embeddings: no output.weight, llama.cpp reuses token_embd (a tied model has no
    # separate head module, so no adapter can target it either)
    if not args.tie_word_embeddings:
        tensors.append(_Tensor("output.weight", source.shapes["output.weight"], "output.weight"))
    return tensors


def _choose_types(tensors: list[_Tensor], dtype: str, n_layers: int) -> None:
    gguf = _gguf()
    from tunelab.models.gguf.quants import q4_k_m_type

    T = gguf.GGMLQuantizationType
    tied = not any(t.name == "output.weight" for t in tensors)
    for t in tensors:
        # (an MoE router and gpt-oss's stacked expert biases: F32 as llama.cpp's converter keeps them)
        if len(t.shape) < 2 or "ffn_gate_inp" in t.name or t.name.endswith(".bias"):
            t.qtype = T.F32
        elif dtype == "f16":
            t.qtype = T.F16
        elif dtype == "bf16":
            t.qtype = T.BF16
        elif dtype == "q8_0":
            # rows that are not a multiple of Q8_0's 32-wide block stay F16 (llama.cpp's choice)
            t.qtype = T.Q8_0 if t.shape[-1] % 32 == 0 else T.F16
        else:
            t.qtype = q4_k_m_type(t.name, t.shape, n_layers, tied_embeddings=tied)
        block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
        n = 1
        for d in t.shape:
            n *= d
        t.nbytes = n // block * type_size


def _write_metadata(writer, args: ModelArgs, dtype: str, name: str) -> None:
    gguf = _gguf()
    file_types = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }
    writer.add_name(name)
    writer.add_file_type(int(file_types[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_rope_dimension_count(args.rotary_dim or args.head_dim)
    writer.add_layer_norm_rms_eps(float(args.norm_eps))
    if args.n_experts:
        writer.add_expert_count(args.n_experts)
        writer.add_expert_used_count(args.experts_per_token)
        writer.add_expert_feed_forward_length(args.moe_hidden_dim)
    if args.head_dim * args.n_heads != args.dim:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    if args.sliding_window is not None and any(args.is_sliding(i) for i in range(args.n_layers)):
        writer.add_sliding_window(args.sliding_window)
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "yarn":  # gpt-oss
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(args.rope_scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(args.rope_scaling["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(args.rope_scaling["beta_fast"]))
        writer.add_rope_scaling_yarn_beta_slow(float(args.rope_scaling["beta_slow"]))
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(args.rope_scaling["factor"]))
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "longrope":
        # llama.cpp picks the long factors when its context exceeds the original length
        writer.add_rope_scaling_attn_factors(float(args.rope_scaling["attention_factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(args.rope_scaling["original_max_position_embeddings"]))


def _check_llama_cpp_can_run(args: ModelArgs, path, dtype: str) -> None:
    """llama.cpp's gemma3 fixes what transformers reads from config.json: every 6th layer
    global, local RoPE base 1e4, and the query scale 1/sqrt(head_dim) (27B: 1/sqrt(dim/heads));
    its qwen3moe has every layer an MoE layer and renormalises the top-k weights. Refuse a file
    it would run differently."""
    if args.model_type == "gpt_oss":
        if args.swiglu_limit != 7.0 or args.swiglu_alpha != 1.702:
            raise CheckpointError(f"{path}: llama.cpp's gpt-oss fixes the experts' activation (limit 7.0, alpha 1.702); "
                                  f"this checkpoint has {args.swiglu_limit}, {args.swiglu_alpha}")
        if dtype == "q4_k_m":
            raise CheckpointError(f"{path}: q4_k_m export of gpt-oss is not supported yet; use q8_0, f16 or bf16")
    elif args.n_experts:
        if any(not args.is_moe(i) for i in range(args.n_layers)) or not args.norm_topk_prob:
            raise CheckpointError(f"{path}: llama.cpp's qwen3moe runs every layer as an MoE layer with renormalised "
                                  "top-k weights; this checkpoint has dense layers or norm_topk_prob false")
        if dtype == "q4_k_m" and args.n_experts == 8:
            raise CheckpointError(f"{path}: q4_k_m export of an 8-expert model is not supported (llama.cpp's mix "
                                  "gives those extra bits tunelab does not follow); use q8_0, f16 or bf16")
    if args.model_type != "gemma3_text":
        return
    pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(args.n_layers)]
    types = args.layer_types or ["sliding_attention"] * args.n_layers
    scalar = args.attn_scale ** -2 if args.attn_scale is not None else args.head_dim
    scalars = [args.head_dim] + ([args.dim / args.n_heads] if args.n_layers == 62 else [])
    if types != pattern or args.rope_local_theta != 10000.0 or not any(abs(scalar - s) < 1e-6 for s in scalars):
        raise CheckpointError(f"{path}: llama.cpp runs Gemma 3 with every 6th layer global, local RoPE base 10000 "
                              "and query_pre_attn_scalar = head_dim; this checkpoint differs, so its GGUF file "
                              "would compute something else")

def _tensor_data(t: _Tensor, args: ModelArgs, source: _Source, lora: dict) -> torch.Tensor:
    """The fp32 tensor to encode for plan entry ``t`` (merged and permuted)."""
    if t.native is None:  # rope_freqs, rope_factors_*
        return _computed_tensors(args)[t.name]
    weight = source.read(t.native)
    merge = lora.get(t.native)
    if merge is not None:
        weight = merge(weight)
    if args.model_type == "gpt_oss" and ".experts." in t.native:
        if t.half is not None:  # gate / up: the even / odd columns (of the bias: its entries)
            weight = weight[..., t.half :: 2]
        if weight.dim() == 3:  # [E, in, out] -> [E, out, in]
            weight = weight.transpose(1, 2)
    elif t.half is not None:  # gate or up rows of stacked [E, 2I, dim] experts
        weight = weight.chunk(2, dim=1)[t.half]
    if GGUF_ARCH[args.model_type] == "llama":  # llama.cpp rotates interleaved pairs there
        if t.native.endswith("attn.q_proj.weight"):
            weight = permute_for_llama_cpp(weight, args.n_heads)
        elif t.native.endswith("attn.k_proj.weight"):
            weight = permute_for_llama_cpp(weight, args.n_kv_heads)
    if args.norm_plus_one and t.native.endswith("norm.weight"):
        weight = weight + 1  # llama.cpp's gemma3 scales by the stored weight (its converter adds the 1)
    return weight.contiguous()


# ---------------------------------------------------------------------------- entry point
def write_gguf(
    checkpoint_dir,
    out_path,
    vocab: Callable[[int], Any],
    *,
    dtype: str = "f16",
    adapter_dir=None,
    overwrite: bool = False,
    modelfile: bool = True,
) -> Path:
    """Write a Llama checkpoint as one GGUF file for llama.cpp (and an Ollama Modelfile).

    Works on a merged folder (``step_N/merged``) or on a base folder plus its adapter
    (``adapter_dir=step_N/adapter``; merged tensor by tensor in fp32). A bitsandbytes nf4
    base (QLoRA) is dequantized first. The file is written under a temporary name and
    renamed at the end, so an interrupted export leaves no half-written ``out_path``.

    Args:
        checkpoint_dir: HF Llama folder (config.json + safetensors).
        out_path: the ``.gguf`` file to write.
        dtype: ``f16`` | ``bf16`` | ``q8_0`` | ``q4_k_m`` (llama.cpp's Q4_K_M mix).
        adapter_dir: optional PEFT LoRA folder to merge into the weights.
        vocab: the model's vocab size -> its GGUF vocabulary (``tokenizer.ggml.*`` keys written by
            its ``write(writer)``, the Modelfile's chat format and stop texts): the tokenizer
            half, from ``tunelab.data.tokenizers.gguf_vocab`` (called after the checks below).
        overwrite: replace an existing ``out_path`` (and Modelfile); otherwise refuse.
        modelfile: also write ``<out stem>.Modelfile`` next to the file (``ollama create``).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ConfigError: unknown dtype, output exists, the gguf package is missing.
        CheckpointError: bad checkpoint folder, tokenizer or adapter (e.g. an adapter for
            another base model).
    """
    dtype = _check_dtype(dtype)
    out = Path(out_path).expanduser()
    modelfile_path = out.with_suffix(".Modelfile") if modelfile else None
    for target in (out, modelfile_path):
        if target is not None and target.exists() and not overwrite:
            raise ConfigError(f"{target} exists; pass --force (overwrite=True) to replace it, or choose another --out")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}")
    gguf = _gguf()

    path = checkpoint_folder(checkpoint_dir)
    config = read_hf_config(path)
    args = args_from_hf_config(config)
    _check_llama_cpp_can_run(args, path, dtype)
    source = _Source(path, config, args)
    from tunelab.models.llama.builders import build_model

    expected = {k: tuple(v.shape) for k, v in build_model(args, device="meta").state_dict().items()}
    check_state_dict({k: torch.empty(s, device="meta") for k, s in source.shapes.items()}, expected, path, args)

    vocab = vocab(args.vocab_size)
    lora = _lora_pairs(args, adapter_dir) if adapter_dir is not None else {}
    tensors = _plan(args, source)
    _choose_types(tensors, dtype, args.n_layers)

    from tunelab.models.gguf.quants import quantize

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, GGUF_ARCH[args.model_type])
    try:
        name = path.name if path.name not in ("merged", "") else path.parent.name
        _write_metadata(writer, args, dtype, name)
        vocab.write(writer)
        for t in tensors:
            # numpy shape order; the writer stores ggml's reversed order
            writer.add_tensor_info(t.name, t.shape, _np_float32(), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            weight = _tensor_data(t, args, source, lora)
            if not torch.isfinite(weight).all():  # no format would hold it; llama.cpp would print garbage
                raise CheckpointError(f"{path}: {t.native or t.name} holds nan/inf values; export a checkpoint "
                                      "saved before the training diverged")
            data = quantize(weight.numpy(), t.qtype)
            del weight
            writer.write_tensor_data(data)
            del data
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    finally:
        source.close()

    if modelfile_path is not None:
        from tunelab.models.gguf.modelfile import write_modelfile

        write_modelfile(modelfile_path, out, vocab)
    return out


def _np_float32():
    import numpy as np

    return np.float32
