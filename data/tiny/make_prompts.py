"""Generate the tiny prompt set for the CPU GRPO demo (``tiny/grpo``).

    python data/tiny/make_prompts.py [--out DIR]      (default: next to this file)

Writes ``grpo.jsonl`` deterministically (a fixed seed, standard library only): 512
``{prompt, answer}`` records of make_assets' one-word tasks (say the first / the last word of
a short list), whose answer a reward can check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

N_PROMPTS = 512
SEED = 2468
HERE = Path(__file__).resolve().parent


def _tasks():
    spec = importlib.util.spec_from_file_location("_tiny_make_assets", HERE / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.task_first_word, module.task_last_word


def make_records(n: int, seed: int) -> list[dict]:
    rng, tasks = random.Random(seed), _tasks()
    records = []
    for _ in range(n):
        instruction, inp, output = rng.choice(tasks)(rng)
        records.append({"prompt": instruction + (f"\n\n{inp}" if inp else ""), "answer": output})
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    text = "".join(json.dumps(r) + "\n" for r in make_records(N_PROMPTS, SEED))
    (args.out / "grpo.jsonl").write_text(text)


if __name__ == "__main__":
    main()
