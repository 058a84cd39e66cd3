"""``builtin:`` paths: a tiny random Llama checkpoint and the packaged tiny data files.

Configs may name these instead of real paths, so ``tune run ... --config tiny/lora`` runs
anywhere with nothing downloaded:

* ``builtin:tiny`` — a small random Llama (4 layers, dim 128, GQA 4/2 heads, vocab = the tiny
  tokenizer's 762) plus the tiny ``tokenizer.model``, written once with ``save_pretrained``
  into ``$TUNELAB_CACHE/tiny-llama-v2`` (default ``~/.cache/tunelab/tiny-llama-v2``). It is
  built in a temp folder and renamed into place, so a killed or concurrent creation never
  leaves a half-written checkpoint. The weights are fixed by a seed: every machine gets the
  same model.
* ``builtin:tiny/<file>`` — a file shipped in ``tunelab/data/tiny/`` (``train.jsonl``,
  ``validation.jsonl``, ``tokenizer.model``).
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import torch

from tunelab.errors import ConfigError

PREFIX = "builtin:"
TINY_NAME = "tiny-llama-v2"  # v2: weights drawn at std dim**-0.5 (v1: 0.02)
TINY_SEED = 0


def tiny_data_dir() -> Path:
    """Folder of the packaged tiny assets (``tunelab/data/tiny``)."""
    import tunelab.data

    return Path(tunelab.data.__file__).resolve().parent / "tiny"


def cache_dir() -> Path:
    """``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab").expanduser()


def is_builtin(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve_builtin(value: str) -> str:
    """Turn a ``builtin:`` path into a real one (materialising the tiny checkpoint if needed);
    any other string is returned unchanged.

    Raises:
        ConfigError: an unknown ``builtin:`` name.
    """
    if not is_builtin(value):
        return value
    name = value[len(PREFIX) :]
    if name == "tiny":
        return str(tiny_checkpoint())
    if name.startswith("tiny/"):
        path = tiny_data_dir() / name[len("tiny/") :]
        if path.is_file():
            return str(path)
        files = sorted(p.name for p in tiny_data_dir().iterdir() if p.is_file() and not p.name.endswith(".py"))
        raise ConfigError(f"{value}: no such packaged file; builtin:tiny/ has {', '.join(files)}")
    raise ConfigError(f"{value}: unknown builtin; use builtin:tiny (checkpoint) or builtin:tiny/<file>")


def tiny_checkpoint() -> Path:
    """The tiny checkpoint folder, created on first use (see module docstring)."""
    target = cache_dir() / TINY_NAME
    tokenizer_src = tiny_data_dir() / "tokenizer.model"
    if (target / "config.json").is_file():
        if filecmp.cmp(target / "tokenizer.model", tokenizer_src, shallow=False):
            return target
        # the packaged tokenizer changed (new tunelab version): rebuild so the vocab matches
        stale = target.with_name(f".{TINY_NAME}.stale{os.getpid()}")
        try:
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # another process moved it first
    tmp = target.with_name(f".{TINY_NAME}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_tiny(tmp, tokenizer_src)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; theirs is identical (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_tiny(out: Path, tokenizer_src: Path) -> None:
    from tunelab.data.tokenizers import load_tokenizer
    from tunelab.models import save_pretrained
    from tunelab.models.llama.builders import build_model, tiny

    shutil.copyfile(tokenizer_src, out / "tokenizer.model")
    tok = load_tokenizer(out)
    args = tiny(
        vocab_size=tok.vocab_size,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=352,
        max_seq_len=2048,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    model = build_model(args, dtype=torch.float32)
    gen = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        # Normal weights at std dim**-0.5, norms at 1, from our own generator (the weights do not
        # depend on the global RNG or on how the model classes initialise). GPT-2's 0.02 would
        # leave dim-128 layers near the identity with near-uniform attention: LoRA alone then
        # barely moves the demo's held-out accuracy; at dim**-0.5 it rises within a CPU minute.
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * args.dim**-0.5)
    save_pretrained(model, out, args=args)
