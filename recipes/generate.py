"""Generate a completion from a checkpoint (+ optional LoRA adapter).

    tune run generate --config generate checkpoint_dir=D prompt="Tell me a joke" max_new_tokens=64
    tune run generate --config generate checkpoint_dir=builtin:tiny adapter_dir=OUT/step_N/adapter

Prints the completion on stdout and, on stderr, the prompt as the model sees it (special tokens
shown, dimmed on a terminal), why generation stopped (a stop token, ``max_new_tokens`` or one
of ``stop_strings``) and, when the completion is empty, what the model generated instead. With
``output_file`` it also writes JSON ``{"prompt", "completion", "prompt_token_ids",
"token_ids", "stop_reason"}`` (``token_ids`` = the generated ids only). ``temperature: 0``
is greedy decoding; ``chat: true`` wraps the prompt as one user turn in the tokenizer's chat
format (with the header that opens the assistant's answer), otherwise the prompt is encoded
as plain text after BOS.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tunelab.data.tokenizers import Message, load_tokenizer
from tunelab.errors import ConfigError
from tunelab.models import from_pretrained
from tunelab.models.checkpoint import check_checkpoint_dir
from tunelab.models.adapters import load_adapter
from tunelab.modules.generation import Generated, generate_until
from tunelab.training.builtin import resolve_builtin
from tunelab.training.config import parse_recipe_args, recipe_entry
from tunelab.training.utils import resolve_device, resolve_dtype, seed_everything


@dataclass(kw_only=True)
class RecipeConfig:
    checkpoint_dir: str  # HF folder or builtin:tiny
    adapter_dir: str | None  # PEFT adapter folder (e.g. OUT/step_N/adapter)
    tokenizer: str | None  # null = the tokenizer inside checkpoint_dir
    prompt: str
    chat: bool  # wrap the prompt in the chat template as a user turn
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_k: int | None
    top_p: float | None
    seed: int
    device: str  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bf16", "fp32"]  # auto = bf16 on cuda, fp32 on cpu
    output_file: str | None
    stop_strings: list[str] = field(default_factory=list)  # the completion ends at the first of these (cut before it)


def main(argv: list[str]) -> dict:
    cfg = parse_recipe_args(argv, RecipeConfig)
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    checkpoint_dir = resolve_builtin(cfg.checkpoint_dir)
    check_checkpoint_dir(checkpoint_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    tokenizer = load_tokenizer(resolve_builtin(cfg.tokenizer) if cfg.tokenizer else checkpoint_dir)
    model = from_pretrained(checkpoint_dir, dtype=dtype, device=device)
    if cfg.adapter_dir is not None:
        load_adapter(model, cfg.adapter_dir)
    model.eval()

    if cfg.chat:
        prompt_ids, _ = tokenizer.tokenize_messages([Message(role="user", content=cfg.prompt)],
                                                    add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(cfg.prompt, add_bos=True, add_eos=False)
    print(f"prompt, as the model sees it ({len(prompt_ids)} tokens): {show_tokens(tokenizer, prompt_ids)}",
          file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop_when = (lambda ids: any(s in tokenizer.decode_generated(ids) for s in cfg.stop_strings)
                 if cfg.stop_strings else None)
    out = generate_until(model, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, stop_tokens=tokenizer.stop_tokens, stop_when=stop_when,
                         generator=generator)
    completion = tokenizer.decode_generated(out.ids)
    if out.reason == "stop_when":  # the completion ends before the stop string (not part of the answer)
        completion = completion[: min(completion.find(s) for s in cfg.stop_strings if s in completion)]
    print(completion)
    reason = stop_reason(tokenizer, out, cfg)
    print(f"[{reason}]", file=sys.stderr)
    if not completion.strip():
        print(f"[{empty_cause(tokenizer, out)}]", file=sys.stderr)
    result = {"prompt": cfg.prompt, "completion": completion, "prompt_token_ids": prompt_ids, "token_ids": out.ids,
              "stop_reason": reason}
    if cfg.output_file is not None:
        path = Path(cfg.output_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def show_tokens(tokenizer, ids: list[int]) -> str:
    """The text of ``ids`` with every special token written out (dimmed on a terminal), so the
    chat headers and BOS the model was given are visible."""
    dim, undim = ("\x1b[2m", "\x1b[22m") if sys.stderr.isatty() else ("", "")
    runs, specials = tokenizer.split_at_special(ids)
    shown = [dim + tokenizer.decode([t], skip_special_tokens=False) + undim for t in specials] + [""]
    return "".join(tokenizer.decode(run) + s for run, s in zip(runs, shown))


def stop_reason(tokenizer, out: Generated, cfg: RecipeConfig) -> str:
    """Why generation ended, in words."""
    n = f"after {len(out.ids)} token{'s' if len(out.ids) != 1 else ''}"
    if out.reason == "stop_token":
        name = tokenizer.decode([out.stop_id], skip_special_tokens=False)
        return f"stopped: stop token {name!r} (id {out.stop_id}) {n}"
    if out.reason == "stop_when":
        return f"stopped: a stop string ({', '.join(map(repr, cfg.stop_strings))}) {n}"
    return f"stopped: max_new_tokens={cfg.max_new_tokens} reached"


def empty_cause(tokenizer, out: Generated) -> str:
    """Why the printed completion is empty: what the model generated instead."""
    if not out.ids:
        return ("nothing generated: the first token drawn was the stop token. Base models often end at once after "
                "a chat prompt (try chat=false), and chat models without their template (try chat=true); "
                "temperature>0 samples past it")
    shown = tokenizer.decode_generated(out.ids, skip_special_tokens=False)
    past = sum(t >= tokenizer.vocab_size for t in out.ids)
    what = f"{len(out.ids)} tokens that decode to no visible text: {shown!r}"
    if past:
        what += f" ({past} ids past the tokenizer's {tokenizer.vocab_size}: the model's padded vocabulary)"
    return "empty completion: the model generated " + what


if __name__ == "__main__":
    recipe_entry(main)
