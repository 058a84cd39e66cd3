"""Generate a completion from a checkpoint (+ optional LoRA adapter).

    tune run generate --config generate checkpoint_dir=D prompt="Tell me a joke" max_new_tokens=64
    tune run generate --config generate checkpoint_dir=builtin:tiny adapter_dir=OUT/step_N/adapter

Prints the completion; with ``output_file`` also writes JSON ``{"prompt", "completion",
"prompt_token_ids", "token_ids"}`` (``token_ids`` = the generated ids only). ``temperature: 0``
is greedy decoding; ``chat: true`` wraps the prompt as one user turn in the tokenizer's chat
format (with the header that opens the assistant's answer), otherwise the prompt is encoded
as plain text after BOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tunelab.data.tokenizers import Message, load_tokenizer
from tunelab.errors import ConfigError
from tunelab.models import from_pretrained
from tunelab.models.checkpoint import check_checkpoint_dir
from tunelab.models.adapters import load_adapter
from tunelab.modules.generation import generate
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
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        token_ids = generate(model, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p, stop_tokens=tokenizer.stop_tokens,
                             generator=generator)
    # a model vocab padded past the tokenizer's can emit ids the tokenizer cannot decode
    completion = tokenizer.decode([t for t in token_ids if t < tokenizer.vocab_size])
    print(completion)
    result = {"prompt": cfg.prompt, "completion": completion, "prompt_token_ids": prompt_ids, "token_ids": token_ids}
    if cfg.output_file is not None:
        out = Path(cfg.output_file).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    recipe_entry(main)
