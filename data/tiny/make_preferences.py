"""Generate the tiny preference set for the CPU DPO demo (``tiny/dpo``).

    python data/tiny/make_preferences.py [--out DIR]      (default: next to this file)

Writes, deterministically (fixed seeds, standard library only, byte-identical on every run):

- ``preferences.jsonl`` (1000) and ``preferences_validation.jsonl`` (100, no prompt of the
  training file): ``{prompt, chosen, rejected}`` records built from the same checkable tasks
  as ``train.jsonl`` (``make_assets.TASKS``). ``chosen`` is the right answer; ``rejected`` is
  a typical wrong one (see ``wrong_answer``). Every fourth record is in the conversational format (message
  lists), so both shapes are exercised.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

N_TRAIN = 1000
N_VALIDATION = 100
TRAIN_SEED = 4321
VALIDATION_SEED = 8765
HERE = Path(__file__).resolve().parent


def _load_task_module():
    """``make_assets`` (the task generators) from this folder; it is a script, not a package."""
    spec = importlib.util.spec_from_file_location("_tiny_make_assets", HERE / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrong_answer(task: str, instruction: str, right: str) -> str:
    """A typical wrong answer for one of make_assets' word tasks (never equal to ``right``): the
    other end of the list (first / last word), the words in the wrong order (repeat, reverse
    the order), the text not uppercased."""
    words = instruction.split(": ", 1)[1].split()
    if task == "task_first_word":
        return words[-1]
    if task == "task_last_word":
        return words[0]
    if task == "task_repeat":
        return " ".join(words[::-1]) if len(words) > 1 else words[0].upper()
    if task == "task_reverse_order":
        return " ".join(words)
    if task == "task_uppercase":
        return right.lower()
    raise ValueError(f"unknown task {task}")


def make_records(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    tasks = _load_task_module().TASKS
    rng = random.Random(seed)
    exclude = set() if exclude is None else exclude
    records: list[dict] = []
    while len(records) < n:
        task = rng.choice(tasks)
        instruction, inp, right = task(rng)
        prompt = f"{instruction}\n\n{inp}" if inp else instruction
        if prompt in exclude:
            continue
        exclude.add(prompt)  # no duplicate prompts either
        wrong = wrong_answer(task.__name__, instruction, right)
        if len(records) % 4 == 3:  # conversational shape
            records.append({"prompt": [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": right}],
                            "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            records.append({"prompt": prompt, "chosen": right, "rejected": wrong})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    train = make_records(N_TRAIN, TRAIN_SEED, exclude=seen)
    validation = make_records(N_VALIDATION, VALIDATION_SEED, exclude=set(seen))
    write_jsonl(train, args.out / "preferences.jsonl")
    write_jsonl(validation, args.out / "preferences_validation.jsonl")
    print(f"wrote {len(train)} train and {len(validation)} validation preference records to {args.out}")


if __name__ == "__main__":
    main()
