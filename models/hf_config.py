"""HF ``config.json`` <-> ``ModelArgs``.

Reads both layouts of the RoPE settings:

* hub files (transformers 4): top-level ``rope_theta`` and ``rope_scaling`` =
  ``{"rope_type" or "type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}`` (or null);
* transformers 5 files: ``rope_parameters = {"rope_type": "default" | "llama3",
  "rope_theta", ...}``;
* Gemma 3: hub ``rope_theta`` + ``rope_scaling`` (global layers) + ``rope_local_base_freq``
  and ``sliding_window_pattern``, or transformers 5's ``rope_parameters`` per layer type and
  ``layer_types``.

Anything the native model cannot reproduce exactly (biases, other activations, other RoPE
types, other architectures) is refused with a ``CheckpointError`` rather than loaded wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from tunelab.errors import CheckpointError
from tunelab.models.llama.args import ModelArgs

# model_type -> the architecture its config.json names. Mistral's network is Llama's (its
# released checkpoints use no sliding window); Qwen2 adds biases on q/k/v; Qwen3 adds per-head
# q/k RMSNorms and states its head_dim; Gemma 3 (text) changes norms, MLP, embeddings and mixes
# sliding-window layers with full ones. Each keeps its own names when saved.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}
# image-text model_type -> (its architecture, the model_type of its text_config)
MULTIMODAL = {"gemma3": ("Gemma3ForConditionalGeneration", "gemma3_text")}
# max_position_embeddings when config.json has none: each transformers config class's default
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "gemma3_text": 131072,
                  "phi3": 4096, "qwen3_moe": 32768, "gpt_oss": 131072}
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Keys hf_config_from_args owns; everything else in a source config is carried over.
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def _require(cfg: dict, key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json has no {key!r}: not a complete config (re-download it)")
    return cfg[key]


def _integer(cfg: dict, key: str, default: Any = None, minimum: int = 1) -> int:
    """``cfg[key]`` as an int >= ``minimum`` (``default`` when absent or null; required when the
    default is None), or a one-line CheckpointError naming the key."""
    value = cfg.get(key)
    if value is None:
        value = _require(cfg, key) if default is None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                         and not value.is_integer()):
        raise CheckpointError(f"config.json {key}={value!r} is not an integer; fix config.json or re-download it")
    if value < minimum:
        raise CheckpointError(f"config.json {key}={value!r} must be >= {minimum}; fix config.json or re-download it")
    return int(value)


def _positive(value: Any, key: str) -> float:
    """``value`` as a float > 0 (finite), or a one-line CheckpointError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise CheckpointError(f"config.json {key}={value!r} must be a positive number; fix config.json or "
                              "re-download it")
    return float(value)


def _rope_settings(cfg: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling or None) from either config layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
        return _rope_dict(params, theta, "rope_parameters")
    return _rope_dict(cfg.get("rope_scaling"), cfg.get("rope_theta", default_theta), "rope_scaling")


def _rope_dict(scaling: Any, theta: Any, where: str) -> tuple[float, dict | None]:
    """(theta, scaling or None) from one RoPE dict (``rope_scaling`` or a ``rope_parameters``
    entry): ``default``, ``llama3`` or ``linear``."""
    theta = _positive(theta, "rope_theta")
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json {where}={scaling!r} is not a dict; expected null or a rope dict")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":  # Gemma 3's global layers: positions divided by factor
        return theta, {"rope_type": "linear", "factor": _positive(scaling.get("factor"), f"{where}.factor")}
    if rope_type == "yarn":  # gpt-oss
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if scaling.get(key) is not None:
                raise CheckpointError(f"config.json {where}.{key}={scaling[key]!r} is not supported; tunelab's YaRN "
                                      "derives the attention factor from factor")
        factor = _positive(scaling.get("factor"), f"{where}.factor")
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": _integer(scaling, "original_max_position_embeddings"),
               "beta_fast": _positive(scaling.get("beta_fast") or 32.0, f"{where}.beta_fast"),
               "beta_slow": _positive(scaling.get("beta_slow") or 1.0, f"{where}.beta_slow"),
               "truncate": bool(scaling.get("truncate", True)),
               "attention_factor": 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0}
        return theta, out
    if rope_type != "llama3":
        raise CheckpointError(f"config.json {where}.rope_type={rope_type!r} is not supported; tunelab supports "
                              "'default', 'linear', 'yarn' and 'llama3'")
    missing = [k for k in LLAMA3_SCALING_KEYS if scaling.get(k) is None]
    if missing:
        raise CheckpointError(f"config.json {where} (rope_type llama3) lacks {', '.join(missing)}; add them")
    out = {"rope_type": "llama3",
           "original_max_position_embeddings": _integer(scaling, "original_max_position_embeddings")}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        out[k] = _positive(scaling[k], f"{where}.{k}")
    return theta, out


def _layer_types(cfg: dict, n_layers: int, pattern_default: int | None) -> list[str] | None:
    """``layer_types`` as written (transformers 5), else from ``sliding_window_pattern`` (hub
    Gemma 3: layer i slides iff (i + 1) % pattern != 0), else None."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or any(
                t not in ("full_attention", "sliding_attention") for t in types):
            raise CheckpointError(f"config.json layer_types={types!r} must list full_attention / sliding_attention "
                                  f"for each of the {n_layers} layers")
        return list(types)
    if pattern_default is None:
        return None
    pattern = _integer(cfg, "sliding_window_pattern", default=pattern_default)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def _gemma3_fields(cfg: dict, n_layers: int) -> dict:
    """The ``ModelArgs`` fields only Gemma 3 sets, from its config (defaults as transformers'
    Gemma3TextConfig: global theta 1e6, local 1e4, window 4096, pattern 6, scalar 256)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise CheckpointError(f"config.json {key}={cfg[key]!r} is not supported; tunelab runs Gemma 3 "
                                  "without softcapping (released checkpoints have null)")
    if cfg.get("use_bidirectional_attention"):
        raise CheckpointError("config.json use_bidirectional_attention=true is not supported; tunelab trains "
                              "causal language models")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        theta, scaling = _rope_dict(full, full.get("rope_theta", 1_000_000.0), "rope_parameters.full_attention")
        local_theta, local_scaling = _rope_dict(local, local.get("rope_theta", 10_000.0),
                                                "rope_parameters.sliding_attention")
    else:
        theta, scaling = _rope_settings(cfg, default_theta=1_000_000.0)
        local_theta, local_scaling = _positive(cfg.get("rope_local_base_freq", 10_000.0), "rope_local_base_freq"), None
    if local_scaling is not None:
        raise CheckpointError(f"config.json: RoPE scaling {local_scaling['rope_type']!r} on the sliding layers is not "
                              "supported (Gemma 3 scales the global layers only)")
    scalar = _positive(cfg.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar")
    return dict(
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        sliding_window=_integer(cfg, "sliding_window", default=4096),
        layer_types=_layer_types(cfg, n_layers, pattern_default=6),
        attn_scale=scalar ** -0.5, norm_plus_one=True, sandwich_norm=True, qk_norm=True,
        hidden_act="gelu_tanh",
    )


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _moe_fields(cfg: dict, n_layers: int) -> dict:
    """Qwen3-MoE's expert settings (hub ``num_experts``, transformers 5 ``num_local_experts``;
    defaults as transformers' Qwen3MoeConfig)."""
    key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    n_experts = _integer(cfg, key, default=128)
    top_k = _integer(cfg, "num_experts_per_tok", default=8)
    if top_k > n_experts:
        raise CheckpointError(f"config.json num_experts_per_tok={top_k} exceeds {key}={n_experts}")
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in dense):
        raise CheckpointError(f"config.json mlp_only_layers={dense!r} must list layer indices below {n_layers}")
    norm = cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise CheckpointError(f"config.json norm_topk_prob={norm!r} must be true or false")
    coef = cfg.get("router_aux_loss_coef", 0.001)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
        raise CheckpointError(f"config.json router_aux_loss_coef={coef!r} must be a number >= 0")
    return dict(n_experts=n_experts, experts_per_token=top_k, moe_hidden_dim=_integer(cfg, "moe_intermediate_size"),
                norm_topk_prob=norm, mlp_only_layers=list(dense),
                decoder_sparse_step=_integer(cfg, "decoder_sparse_step", default=1),
                router_aux_loss_coef=float(coef))


def _gpt_oss_fields(cfg: dict, n_layers: int) -> dict:
    """gpt-oss: biases on every attention projection, per-head sinks, alternating sliding and
    full layers (transformers' default when layer_types is absent), YaRN, and its experts
    (defaults as transformers' GptOssConfig)."""
    default_rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                    "original_max_position_embeddings": 4096}
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None
    rope = params if params is not None else (cfg.get("rope_scaling") or default_rope)
    theta, scaling = _rope_dict(rope, (params or cfg).get("rope_theta", cfg.get("rope_theta", 150000.0)),
                                "rope_parameters" if params is not None else "rope_scaling")
    types = _layer_types(cfg, n_layers, pattern_default=2)
    limit = cfg.get("swiglu_limit", 7.0)
    alpha = cfg.get("swiglu_alpha", 1.702)
    if cfg.get("attention_bias", True) is not True:
        raise CheckpointError(f"config.json attention_bias={cfg.get('attention_bias')!r} is not supported for gpt_oss; "
                              "its attention projections have biases")
    n_experts = _integer(cfg, "num_local_experts", default=128)
    top_k = _integer(cfg, "num_experts_per_tok", default=4)
    if top_k > n_experts:
        raise CheckpointError(f"config.json num_experts_per_tok={top_k} exceeds num_local_experts={n_experts}")
    return dict(rope_theta=theta, rope_scaling=scaling, layer_types=types,
                sliding_window=_integer(cfg, "sliding_window", default=128), qkv_bias=True, o_bias=True,
                attn_sinks=True, n_experts=n_experts, experts_per_token=top_k,
                moe_hidden_dim=_integer(cfg, "intermediate_size"), norm_topk_prob=True,
                swiglu_limit=_positive(limit, "swiglu_limit"), swiglu_alpha=_positive(alpha, "swiglu_alpha"),
                router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)))


def _phi3_fields(cfg: dict, head_dim: int, max_positions: int) -> dict:
    """The ``ModelArgs`` fields only Phi-3 sets: fused projections, partial rotary and
    ``longrope`` (hub: top-level partial_rotary_factor / original_max_position_embeddings and
    rope_scaling of type longrope, su or yarn; transformers 5: all inside rope_parameters)."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None
    rope = params if params is not None else (cfg.get("rope_scaling") or {})
    where = "rope_parameters" if params is not None else "rope_scaling"
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json {where}={rope!r} is not a dict; expected null or a longrope dict")
    theta = _positive((params or cfg).get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta")
    partial = (params or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise CheckpointError(f"config.json partial_rotary_factor={partial!r} must be in (0, 1]")
    rotary_dim = int(head_dim * partial)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return dict(rope_theta=theta, rope_scaling=None, rotary_dim=rotary_dim, fused_projections=True)
    if rope_type not in ("longrope", "su", "yarn"):
        raise CheckpointError(f"config.json {where}.rope_type={rope_type!r} is not supported for phi3; tunelab "
                              "supports 'default' and 'longrope'")
    original = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 4096))
    original = _integer({"original_max_position_embeddings": original}, "original_max_position_embeddings")
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = rope.get(key)
        if (not isinstance(value, list) or len(value) != rotary_dim // 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
            raise CheckpointError(f"config.json {where}.{key} must list {rotary_dim // 2} positive numbers (one per "
                                  "rotary frequency)")
        factors[key] = [float(v) for v in value]
    factor = rope.get("factor") or max_positions / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling = {"rope_type": "longrope", **factors, "original_max_position_embeddings": original,
               "attention_factor": _positive(attention_factor, f"{where}.attention_factor")}
    return dict(rope_theta=theta, rope_scaling=scaling, rotary_dim=rotary_dim, fused_projections=True)


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """Build ``ModelArgs`` from a parsed HF ``config.json`` of a supported family
    (:data:`ARCHITECTURES`, or an image-text config of :data:`MULTIMODAL`).

    Args:
        cfg: the config dict. Unknown extra keys are ignored.

    Raises:
        CheckpointError: one line naming the key, for what the native model cannot run exactly
            (another model_type / architecture, biases where the family has none, another
            activation or RoPE type, a live Qwen sliding window, Gemma softcapping, ...) or a
            value of the wrong type or range.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    if isinstance(cfg.get("model_type"), str) and cfg["model_type"] in MULTIMODAL:
        return _multimodal_args(cfg)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise CheckpointError(f"config.json model_type={model_type!r} is not supported; tunelab loads "
                              f"{', '.join(repr(t) for t in ARCHITECTURES)} models")
    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list):
            raise CheckpointError(f"config.json architectures={archs!r} must be a list such as "
                                  f"{[ARCHITECTURES[model_type]]}")
        if not archs or any(a != ARCHITECTURES[model_type] for a in archs):
            raise CheckpointError(
                f"config.json architectures={archs!r} is not supported for model_type {model_type!r}; "
                f"tunelab loads {[ARCHITECTURES[model_type]]}"
            )
    n_layers = _integer(cfg, "num_hidden_layers")
    gemma = model_type == "gemma3_text"
    if model_type.startswith("qwen"):
        # Qwen configs state a window size but switch it off (use_sliding_window defaults to false)
        if cfg.get("use_sliding_window", False):
            raise CheckpointError(f"config.json use_sliding_window={cfg['use_sliding_window']!r} is not supported; "
                                  "tunelab attends over the whole context (released Qwen checkpoints have false)")
        window = None
    elif gemma:
        window = None  # _gemma3_fields reads it
    elif model_type == "gpt_oss":
        window = None  # _gpt_oss_fields reads it
    else:  # Llama has no window; Mistral's applies to every layer when set
        window = None if cfg.get("sliding_window") is None else _integer(cfg, "sliding_window")
    layer_types = None if gemma or model_type == "gpt_oss" else _layer_types(cfg, n_layers, pattern_default=None)
    if layer_types is not None and "sliding_attention" in layer_types and window is None:
        raise CheckpointError(f"config.json layer_types lists sliding_attention layers but sliding_window is "
                              f"{cfg.get('sliding_window')!r}; give the window size")
    if layer_types is not None and all(t == "full_attention" for t in layer_types):
        layer_types = None
    # Qwen2's q/k/v biases are part of its architecture (its config has no switch for them)
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) and model_type not in ("qwen2", "gpt_oss"):
            raise CheckpointError(f"config.json {key}={cfg[key]!r} is not supported for model_type "
                                  f"{model_type!r}; its projections have no biases")
    act_key = "hidden_activation" if gemma and "hidden_activation" in cfg else "hidden_act"
    act = cfg.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in ((*_GELU_TANH,) if gemma else ("silu",)):
        raise CheckpointError(f"config.json {act_key}={act!r} is not supported for model_type {model_type!r}; "
                              f"tunelab's MLP uses {'gelu_pytorch_tanh' if gemma else 'silu'!r}")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0 and model_type != "phi3":
        raise CheckpointError(
            f"config.json partial_rotary_factor={cfg['partial_rotary_factor']!r} is not supported for model_type "
            f"{model_type!r}; only 1.0"
        )

    # every field the model uses: its type and range, one line naming the key when wrong
    n_heads = _integer(cfg, "num_attention_heads")
    dim = _integer(cfg, "hidden_size")
    tied = cfg.get("tie_word_embeddings", gemma)
    if not isinstance(tied, bool):
        raise CheckpointError(f"config.json tie_word_embeddings={tied!r} must be true or false")
    head_dim = _integer(cfg, "head_dim", default=max(dim // n_heads, 1))
    max_positions = _integer(cfg, "max_position_embeddings", default=_MAX_POSITIONS[model_type])
    if gemma:
        family = _gemma3_fields(cfg, n_layers)
        family["embed_scale"] = dim ** 0.5
    elif model_type == "phi3":
        family = dict(_phi3_fields(cfg, head_dim, max_positions), sliding_window=window)
    elif model_type == "gpt_oss":
        family = _gpt_oss_fields(cfg, n_layers)
    else:
        rope_theta, rope_scaling = _rope_settings(cfg)
        family = dict(rope_theta=rope_theta, rope_scaling=rope_scaling, sliding_window=window,
                      layer_types=layer_types, qk_norm=model_type in ("qwen3", "qwen3_moe"),
                      qkv_bias=model_type == "qwen2")
        if model_type == "qwen3_moe":
            family.update(_moe_fields(cfg, n_layers))
    try:
        return ModelArgs(
            vocab_size=_integer(cfg, "vocab_size"),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=_integer(cfg, "num_key_value_heads", default=n_heads),
            head_dim=head_dim,
            hidden_dim=_integer(cfg, "intermediate_size"),
            norm_eps=_positive(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            max_seq_len=max_positions,
            tie_word_embeddings=tied,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            model_type=model_type,
            **family,
        )
    except ValueError as e:  # inconsistent head counts etc.
        raise CheckpointError(f"config.json is inconsistent: {e}") from None


def _multimodal_args(cfg: dict) -> ModelArgs:
    """The language model of an image-text config (``text_config``, keys missing there
    defaulting as transformers' text config class does); tied embeddings from the top level."""
    arch, text_type = MULTIMODAL[cfg["model_type"]]
    archs = cfg.get("architectures")
    if archs is not None and archs != [arch]:
        raise CheckpointError(f"config.json architectures={archs!r} is not supported for model_type "
                              f"{cfg['model_type']!r}; tunelab loads {[arch]}")
    text = cfg.get("text_config") or {}
    if not isinstance(text, dict):
        raise CheckpointError(f"config.json text_config={text!r} must be a JSON object")
    text = dict(text, model_type=text_type)
    text.pop("architectures", None)
    if "tie_word_embeddings" in cfg:
        text.setdefault("tie_word_embeddings", cfg["tie_word_embeddings"])
    return dataclasses.replace(args_from_hf_config(text), multimodal=True)


def hf_config_from_args(args: ModelArgs, source_config: dict | None = None) -> dict:
    """A ``config.json`` dict for ``args`` that ``transformers`` loads as the model's family
    (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
    ``Gemma3ForCausalLM``, ``Phi3ForCausalLM``).

    Args:
        args: the architecture.
        source_config: the config the model was loaded from. Its extra keys (token ids,
            dtype, generation settings...) are kept, and so is its RoPE layout
            (``rope_parameters`` vs top-level ``rope_theta`` + ``rope_scaling``). Without it the
            hub layout is written, which both transformers 4 and 5 read.
    """
    if args.multimodal:  # the source's config with its text_config rewritten
        if not source_config or source_config.get("model_type") not in tuple(MULTIMODAL):
            raise CheckpointError("an image-text model is saved from the folder it was loaded from; pass source_dir")
        cfg = copy.deepcopy(source_config)
        text = hf_config_from_args(dataclasses.replace(args, multimodal=False), cfg.get("text_config") or {})
        text.pop("architectures")
        cfg["text_config"] = text
        return dict(sorted(cfg.items()))
    cfg = copy.deepcopy(source_config) if source_config else {}
    use_rope_parameters = isinstance(cfg.get("rope_parameters"), dict)
    for key in (*_ROPE_KEYS, "rope_local_base_freq", "layer_types"):
        cfg.pop(key, None)
    gemma = args.model_type == "gemma3_text"
    cfg.update(
        architectures=[ARCHITECTURES[args.model_type]],
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    if gemma:
        cfg.pop("hidden_act", None)
        scalar = args.attn_scale ** -2 if args.attn_scale is not None else args.head_dim
        cfg.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False, sliding_window=args.sliding_window,
                   query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                   final_logit_softcapping=None, attn_logit_softcapping=None)
    else:
        cfg["hidden_act"] = "silu"
    if args.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif args.model_type == "mistral":  # no bias keys in its config class
        cfg["sliding_window"] = args.sliding_window
    elif args.model_type == "qwen2":  # biases on q/k/v are implied by the architecture
        cfg["use_sliding_window"] = False
    elif args.model_type in ("qwen3", "qwen3_moe"):
        cfg.update(attention_bias=False, use_sliding_window=False)
    if args.model_type == "gpt_oss":
        cfg.update(attention_bias=True, sliding_window=args.sliding_window, num_local_experts=args.n_experts,
                   num_experts_per_tok=args.experts_per_token, swiglu_limit=args.swiglu_limit,
                   swiglu_alpha=args.swiglu_alpha, router_aux_loss_coef=args.router_aux_loss_coef)
    elif args.n_experts:  # the source's spelling (transformers 5: num_local_experts), else the hub's
        key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
        cfg.update({key: args.n_experts},
                   num_experts_per_tok=args.experts_per_token, moe_intermediate_size=args.moe_hidden_dim,
                   norm_topk_prob=args.norm_topk_prob, mlp_only_layers=list(args.mlp_only_layers or []),
                   decoder_sparse_step=args.decoder_sparse_step, router_aux_loss_coef=args.router_aux_loss_coef)
    elif args.model_type == "phi3":
        cfg["sliding_window"] = args.sliding_window
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            cfg.pop(key, None)
    if args.layer_types is not None:
        cfg["layer_types"] = list(args.layer_types)
    cfg.setdefault("attention_dropout", 0.0)
    cfg.setdefault("initializer_range", 0.02)
    cfg.setdefault("use_cache", True)
    if args.bos_token_id is not None:
        cfg.setdefault("bos_token_id", args.bos_token_id)
    if args.eos_token_id is not None:
        cfg.setdefault("eos_token_id", args.eos_token_id)

    scaling = dict(args.rope_scaling) if args.rope_scaling is not None else None
    if scaling is not None and scaling["rope_type"] == "yarn":
        del scaling["attention_factor"]  # derived from factor again when read
    partial = {}
    if args.rotary_dim is not None and args.rotary_dim != args.head_dim:
        partial["partial_rotary_factor"] = args.rotary_dim / args.head_dim
    if scaling is not None and scaling["rope_type"] == "longrope":  # Phi3Config reads it at the top level
        cfg["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        if not use_rope_parameters:
            del scaling["original_max_position_embeddings"]
    if use_rope_parameters:
        params = {"rope_type": "default"} if scaling is None else dict(scaling)
        params.update(partial, rope_theta=args.rope_theta)
        if gemma:  # one entry per layer type
            params = {"full_attention": params,
                      "sliding_attention": {"rope_type": "default", "rope_theta": args.rope_local_theta}}
        cfg["rope_parameters"] = params
    else:
        cfg.update(partial, rope_theta=args.rope_theta, rope_scaling=scaling)
        if gemma:
            cfg["rope_local_base_freq"] = args.rope_local_theta
    return dict(sorted(cfg.items()))
