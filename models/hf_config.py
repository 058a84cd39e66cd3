"""HF ``config.json`` <-> ``ModelArgs``.

Reads both layouts of the RoPE settings:

* hub files (transformers 4): top-level ``rope_theta`` and ``rope_scaling`` =
  ``{"rope_type" or "type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}`` (or null);
* transformers 5 files: ``rope_parameters = {"rope_type": "default" | "llama3",
  "rope_theta", ...}``.

Anything the native model cannot reproduce exactly (biases, other activations, other RoPE
types, other architectures) is refused with a ``CheckpointError`` rather than loaded wrong.
"""

from __future__ import annotations

import copy
from typing import Any

from tunelab.errors import CheckpointError
from tunelab.models.llama.args import ModelArgs

# model_type -> the architecture its config.json names. Mistral's network is Llama's (its
# released checkpoints use no sliding window); Qwen2 adds biases on q/k/v; Qwen3 adds per-head
# q/k RMSNorms and states its head_dim. Each keeps its own names when saved.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# max_position_embeddings when config.json has none: each transformers config class's default
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Keys hf_config_from_args owns; everything else in a source config is carried over.
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def _require(cfg: dict, key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json has no {key!r}: not a complete Llama config (re-download it)")
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


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling or None) from either config layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling, where = params, "rope_parameters"
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling, where = cfg.get("rope_scaling"), "rope_scaling"
    theta = _positive(theta, "rope_theta")
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json {where}={scaling!r} is not a dict; expected null or a llama3 rope dict")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            f"config.json {where}.rope_type={rope_type!r} is not supported; tunelab supports 'default' and 'llama3'"
        )
    missing = [k for k in LLAMA3_SCALING_KEYS if scaling.get(k) is None]
    if missing:
        raise CheckpointError(f"config.json {where} (rope_type llama3) lacks {', '.join(missing)}; add them")
    out = {"rope_type": "llama3",
           "original_max_position_embeddings": _integer(scaling, "original_max_position_embeddings")}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        out[k] = _positive(scaling[k], f"{where}.{k}")
    return theta, out


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """Build ``ModelArgs`` from a parsed HF Llama ``config.json``.

    Args:
        cfg: the config dict. Unknown extra keys are ignored.

    Raises:
        CheckpointError: the config describes something the native Llama cannot run exactly
            (model_type/architectures other than Llama, attention_bias/mlp_bias, hidden_act
            other than silu, RoPE types other than default/llama3, partial rotary).
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
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
    if model_type.startswith("qwen"):
        # Qwen configs state a window size but switch it off (use_sliding_window defaults to false)
        if cfg.get("use_sliding_window", False):
            raise CheckpointError(f"config.json use_sliding_window={cfg['use_sliding_window']!r} is not supported; "
                                  "tunelab attends over the whole context (released Qwen checkpoints have false)")
    elif cfg.get("sliding_window") is not None:
        raise CheckpointError(f"config.json sliding_window={cfg['sliding_window']!r} is not supported; tunelab "
                              "attends over the whole context (released Mistral 7B v0.3 / Nemo have null)")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list)
                                    or any(t != "full_attention" for t in layer_types)):
        raise CheckpointError(f"config.json layer_types={layer_types!r} is not supported; tunelab's layers attend "
                              "over the whole context (every entry full_attention)")
    # Qwen2's q/k/v biases are part of its architecture (its config has no switch for them)
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) and model_type != "qwen2":
            raise CheckpointError(f"config.json {key}={cfg[key]!r} is not supported for model_type "
                                  f"{model_type!r}; its projections have no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json hidden_act={act!r} is not supported; tunelab's Llama MLP uses 'silu'")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(
            f"config.json partial_rotary_factor={cfg['partial_rotary_factor']!r} is not supported; only 1.0"
        )

    rope_theta, rope_scaling = _rope_settings(cfg)
    # every field the model uses: its type and range, one line naming the key when wrong
    n_heads = _integer(cfg, "num_attention_heads")
    dim = _integer(cfg, "hidden_size")
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise CheckpointError(f"config.json tie_word_embeddings={tied!r} must be true or false")
    try:
        return ModelArgs(
            vocab_size=_integer(cfg, "vocab_size"),
            dim=dim,
            n_layers=_integer(cfg, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=_integer(cfg, "num_key_value_heads", default=n_heads),
            head_dim=_integer(cfg, "head_dim", default=max(dim // n_heads, 1)),
            hidden_dim=_integer(cfg, "intermediate_size"),
            norm_eps=_positive(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=_integer(cfg, "max_position_embeddings", default=_MAX_POSITIONS[model_type]),
            tie_word_embeddings=tied,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            model_type=model_type,
            qk_norm=model_type == "qwen3",
            qkv_bias=model_type == "qwen2",
        )
    except ValueError as e:  # inconsistent head counts etc.
        raise CheckpointError(f"config.json is inconsistent: {e}") from None


def hf_config_from_args(args: ModelArgs, source_config: dict | None = None) -> dict:
    """A ``config.json`` dict for ``args`` that ``transformers`` loads as the model's family
    (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``).

    Args:
        args: the architecture.
        source_config: the config the model was loaded from. Its extra keys (token ids,
            dtype, generation settings...) are kept, and so is its RoPE layout
            (``rope_parameters`` vs top-level ``rope_theta`` + ``rope_scaling``). Without it the
            hub layout is written, which both transformers 4 and 5 read.
    """
    cfg = copy.deepcopy(source_config) if source_config else {}
    use_rope_parameters = isinstance(cfg.get("rope_parameters"), dict)
    for key in _ROPE_KEYS:
        cfg.pop(key, None)
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
        hidden_act="silu",
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    if args.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif args.model_type == "mistral":  # no bias keys in its config class; the window is off
        cfg["sliding_window"] = None
    elif args.model_type == "qwen2":  # biases on q/k/v are implied by the architecture
        cfg["use_sliding_window"] = False
    else:  # qwen3
        cfg.update(attention_bias=False, use_sliding_window=False)
    cfg.setdefault("attention_dropout", 0.0)
    cfg.setdefault("initializer_range", 0.02)
    cfg.setdefault("use_cache", True)
    if args.bos_token_id is not None:
        cfg.setdefault("bos_token_id", args.bos_token_id)
    if args.eos_token_id is not None:
        cfg.setdefault("eos_token_id", args.eos_token_id)

    scaling = dict(args.rope_scaling) if args.rope_scaling is not None else None
    if use_rope_parameters:
        params = {"rope_type": "default"} if scaling is None else dict(scaling)
        params["rope_theta"] = args.rope_theta
        cfg["rope_parameters"] = params
    else:
        cfg["rope_theta"] = args.rope_theta
        cfg["rope_scaling"] = scaling
    return dict(sorted(cfg.items()))
