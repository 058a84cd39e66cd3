"""Generate the tiny CPU-demo assets: synthetic instruct data and a tiny Llama-3-style tokenizer.

    python data/tiny/make_assets.py [--out DIR]      (default: next to this file)

Writes, deterministically (fixed seeds, pure standard library, byte-identical on every run):

- ``train.jsonl`` (8000) and ``validation.jsonl`` (100, the held-out split): alpaca records
  ``{instruction, input, output}`` of small word tasks whose answers can be checked exactly
  (first word, last word, repeat, reverse the word order, uppercase) over 60 words. No
  validation prompt is in train, so the demo's held-out accuracy measures what generalised,
  not what was memorised. The tasks are copy-and-map tasks on purpose: a 4-layer random model
  trained only through LoRA learns them within a CPU minute (arithmetic it does not).
- ``tokenizer.model``: a tiktoken-format BPE file (``base64(token) rank`` per line), the 256
  single bytes first, then 250 merges learned by the small BPE trainer below on a frozen corpus
  (``_corpus_records``), pre-split with the Llama 3 regex. The Llama 3 loader appends its 256 special tokens,
  so the full vocab is 762.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
from collections import Counter
from pathlib import Path

N_TRAIN = 8000
N_VALIDATION = 100
N_MERGES = 250
TRAIN_SEED = 1234
VALIDATION_SEED = 5678

WORDS = (
    "apple banana cherry garden planet river stone window yellow orange purple silver "
    "dragon castle forest butter candle dinner rocket summer winter spring autumn tiger "
    "monkey rabbit turtle pencil marble puzzle shadow thunder bridge circle flower island "
    "jungle kitten lemon meadow needle ocean pepper quiet rainbow sunset tomato velvet wizard "
    "anchor basket cloud desert engine feather guitar hammer jacket ladder mirror nickel "
    "pillow saddle ticket violin wallet zebra"
).split()

# Llama 3's pre-tokenizer regex, written with the standard `re` module: \p{L} -> [^\W\d_]
# and \p{N} -> \d. Exact for ASCII text (the generated corpus is asserted to be ASCII).
PRE_SPLIT = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|(?:[^\r\n\w]|_)?[^\W\d_]+"
    r"|\d{1,3}"
    r"| ?(?:[^\s\w]|_)+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


# ---------------------------------------------------------------------------------------------
# Synthetic tasks: each returns (instruction, input, output)


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _ask(instruction: str, words: list[str]) -> tuple[str, str]:
    return f"{instruction}: {' '.join(words)}", ""


def task_first_word(rng):
    words = _words(rng, 2, 4)
    return (*_ask("Say the first word", words), words[0])


def task_last_word(rng):
    words = _words(rng, 2, 4)
    return (*_ask("Say the last word", words), words[-1])


def task_repeat(rng):
    words = _words(rng, 1, 3)
    return (*_ask("Repeat the words", words), " ".join(words))


def task_reverse_order(rng):
    words = _words(rng, 2, 3)
    return (*_ask("Reverse the order of the words", words), " ".join(words[::-1]))


def task_uppercase(rng):
    words = _words(rng, 1, 3)
    return (*_ask("Uppercase the words", words), " ".join(words).upper())


TASKS = (task_first_word, task_last_word, task_repeat, task_reverse_order, task_uppercase)


def make_records(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    rng = random.Random(seed)
    exclude = exclude or set()
    records = []
    while len(records) < n:
        instruction, inp, output = rng.choice(TASKS)(rng)
        if (instruction, inp) in exclude:
            continue
        records.append({"instruction": instruction, "input": inp, "output": output})
    return records


# ---------------------------------------------------------------------------------------------
# The tokenizer's corpus: the first demo's tasks (numbers and single words), frozen. The
# tokenizer was trained on them before the demo moved to the word tasks above; training it on
# the same text keeps tokenizer.model byte-identical, and with it every test that pins numbers
# (losses, tolerances, GGUF agreement) to its ids. The word tasks tokenize well with it: the 60
# words are in this text too.


def _corpus_records() -> list[dict]:
    """The first demo's 2000 training records (same generators, same RNG calls, same seed)."""
    rng = random.Random(TRAIN_SEED)
    num = lambda k: [rng.randint(0, 99) for _ in range(k)]  # noqa: E731

    def add():
        a, b = num(2)
        return f"Add {a} and {b}.", "", str(a + b)

    def subtract():
        a, b = sorted(num(2), reverse=True)
        return f"Subtract {b} from {a}.", "", str(a - b)

    def reverse():
        w = rng.choice(WORDS)
        return (f"Reverse the word '{w}'.", "", w[::-1]) if rng.random() < 0.5 else ("Reverse the word.", w, w[::-1])

    def uppercase():
        text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        if rng.random() < 0.5:
            return f"Uppercase: {text}", "", text.upper()
        return "Convert the text to uppercase.", text, text.upper()

    def sort():
        nums = num(rng.randint(3, 5))
        listed, answer = " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))
        if rng.random() < 0.5:
            return f"Sort these numbers: {listed}", "", answer
        return "Sort the numbers from smallest to largest.", listed, answer

    def largest():
        nums = num(rng.randint(3, 4))
        return f"What is the largest of {', '.join(map(str, nums))}?", "", str(max(nums))

    def count():
        w = rng.choice(WORDS)
        return f"How many letters are in '{w}'?", "", str(len(w))

    tasks = (add, subtract, reverse, uppercase, sort, largest, count)
    records = []
    for _ in range(2000):
        instruction, inp, output = rng.choice(tasks)()
        records.append({"instruction": instruction, "input": inp, "output": output})
    return records


# ---------------------------------------------------------------------------------------------
# Byte-level BPE trainer (pure Python; fine for a corpus of a few thousand distinct words)


def train_bpe(texts: list[str], n_merges: int) -> list[bytes]:
    """Return the vocab in rank order: 256 single bytes, then up to ``n_merges`` merged tokens.

    Merges the most frequent adjacent pair each round (ties -> smallest pair of bytes), the
    order tiktoken replays when encoding (lowest rank first).
    """
    words = Counter()
    for text in texts:
        for chunk in PRE_SPLIT.findall(text):
            words[chunk.encode("utf-8")] += 1
    # Each distinct chunk as a list of current tokens, with its count.
    seqs = [([bytes([b]) for b in chunk], count) for chunk, count in words.items()]
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    while len(vocab) < 256 + n_merges:
        pairs: Counter = Counter()
        for seq, count in seqs:
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b
        if merged not in known:  # the same bytes may arise from two different pairs
            vocab.append(merged)
            known.add(merged)
        for seq, _count in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == a and seq[i + 1] == b:
                    seq[i : i + 2] = [merged]
                i += 1
    return vocab


def write_tiktoken(vocab: list[bytes], path: Path) -> None:
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(vocab)]
    path.write_text("".join(lines), encoding="ascii", newline="\n")


def write_jsonl(records: list[dict], path: Path) -> None:
    text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    train = make_records(N_TRAIN, TRAIN_SEED)
    seen = {(r["instruction"], r["input"]) for r in train}
    validation = make_records(N_VALIDATION, VALIDATION_SEED, exclude=seen)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(validation, args.out / "validation.jsonl")

    # Train on every field of the (frozen) corpus plus the Llama 3 header text of each record
    # (roles and the blank line after the header), so headers cost a few tokens, not one per byte.
    corpus = _corpus_records()
    texts = [r[k] for r in corpus for k in ("instruction", "input", "output") if r[k]]
    texts += ["user", "\n\n", "assistant", "\n\n"] * len(corpus) + ["system"] * 100
    assert all(t.isascii() for t in texts), "PRE_SPLIT is only exact for ASCII"
    vocab = train_bpe(texts, N_MERGES)
    write_tiktoken(vocab, args.out / "tokenizer.model")
    print(f"wrote {len(train)} train, {len(validation)} validation records and a "
          f"{len(vocab)}-token BPE vocab to {args.out}")


if __name__ == "__main__":
    main()
