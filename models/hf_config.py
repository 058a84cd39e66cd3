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

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Keys hf_config_from_args owns; everything else in a source config is carried over.
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def _require(cfg: dict, key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json has no {key!r}: not a complete Llama config (re-download it)")
    return cfg[key]


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling or None) from either config layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling, where = params, "rope_parameters"
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling, where = cfg.get("rope_scaling"), "rope_scaling"
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json {where}={scaling!r} is not a dict; expected null or a llama3 rope dict")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(
            f"config.json {where}.rope_type={rope_type!r} is not supported; tunelab supports 'default' and 'llama3'"
        )
    missing = [k for k in LLAMA3_SCALING_KEYS if scaling.get(k) is None]
    if missing:
        raise CheckpointError(f"config.json {where} (rope_type llama3) lacks {', '.join(missing)}; add them")
    out = {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_SCALING_KEYS}}
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        out[k] = float(out[k])
    return float(theta), out


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
    if model_type != "llama":
        raise CheckpointError(f"config.json model_type={model_type!r} is not supported; tunelab loads 'llama' models")
    archs = cfg.get("architectures")
    if archs is not None:
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad or not archs:
            raise CheckpointError(
                f"config.json architectures={archs!r} is not supported; tunelab loads {list(SUPPORTED_ARCHITECTURES)}"
            )
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"config.json {key}={cfg[key]!r} is not supported; the native Llama has no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json hidden_act={act!r} is not supported; tunelab's Llama MLP uses 'silu'")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(
            f"config.json partial_rotary_factor={cfg['partial_rotary_factor']!r} is not supported; only 1.0"
        )

    rope_theta, rope_scaling = _rope_settings(cfg)
    n_heads = int(_require(cfg, "num_attention_heads"))
    dim = int(_require(cfg, "hidden_size"))
    try:
        return ModelArgs(
            vocab_size=int(_require(cfg, "vocab_size")),
            dim=dim,
            n_layers=int(_require(cfg, "num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            hidden_dim=int(_require(cfg, "intermediate_size")),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
    except ValueError as e:  # inconsistent head counts etc.
        raise CheckpointError(f"config.json is inconsistent: {e}") from None


def hf_config_from_args(args: ModelArgs, source_config: dict | None = None) -> dict:
    """A ``config.json`` dict for ``args`` that ``transformers`` loads as ``LlamaForCausalLM``.

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
        architectures=["LlamaForCausalLM"],
        model_type="llama",
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
        attention_bias=False,
        mlp_bias=False,
    )
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
