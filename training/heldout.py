"""Exact-match accuracy of greedy answers on held-out rows: the evidence that a run learned.

A falling loss says the model fits its training rows; a right answer to a prompt it never saw
says it learned the task. The single-device recipes score ``heldout_accuracy`` rows of their
``validation`` set twice — with the adapters off (the base model, which is what the run
starts from, so a resumed run reports the same "before") and after training — and print::

    held-out accuracy: 2% before -> 55% after (n=100, exact match, greedy)

An answer counts when its decoded text, stripped of surrounding whitespace, equals the row's
reference answer (SFT: the trained target; preference rows: ``chosen``). Generation is greedy
through the KV cache, one row at a time, and stops at the tokenizer's stop ids or after the
longest reference plus ``SLACK_TOKENS`` (at most ``MAX_NEW_TOKENS``); a row whose answer can no
longer match stops there (same verdict, less work: an untrained model rarely says its stop
token), except the first few, which are printed whole. With
``heldout_accuracy: null`` the recipes still print three held-out answers at the end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from torch import nn

from tunelab.errors import ConfigError
from tunelab.modules.generation import generate
from tunelab.modules.loss import IGNORE_INDEX
from tunelab.modules.peft import disable_adapters

__all__ = ["HeldOut", "HeldOutRow", "HeldOutScore", "heldout_rows", "score_heldout", "report_heldout", "check_heldout"]

SLACK_TOKENS = 8  # generated past the longest reference: a wrong answer may run longer
MAX_NEW_TOKENS = 256  # cap per answer (a longer reference cannot match)
EXAMPLES = 3  # held-out answers printed after training


@dataclass
class HeldOutRow:
    """One held-out question: its prompt ids (everything the model sees before the answer) and
    the reference answer's ids (stop ids excluded)."""

    prompt: list[int]
    answer: list[int]


@dataclass
class HeldOutScore:
    """One pass over the rows: each row's generated ids and whether its decoded text matched
    the reference (both in row order)."""

    rows: list[HeldOutRow]
    generated: list[list[int]] = field(repr=False)
    right: list[bool] = field(repr=False)

    @property
    def correct(self) -> int:
        return sum(self.right)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.rows)


def check_heldout(n: int | None) -> None:
    """``heldout_accuracy`` is a positive row count or null.

    Raises:
        ConfigError: naming the key and the fix.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"heldout_accuracy: {n!r} is not a positive row count; use e.g. 100, or null for none")


class HeldOut:
    """The recipes' held-out questions: picked and (``n`` set) scored on the base model when
    built, scored again and reported by :meth:`report` after training.

    Args:
        model: the model with its (still untrained or restored) adapters; "before" switches them off.
        tokenizer: the run's tokenizer.
        n: ``heldout_accuracy``: rows to score, or None to only show three answers at the end.
        validation: the validation dataset (None: no accuracy, the answers come from ``train``).
        train: the training dataset.
    """

    def __init__(self, model: nn.Module, tokenizer, n: int | None, validation, train):
        if n is not None and validation is None:
            print("notice: heldout_accuracy needs a validation set to draw held-out rows from; skipped")
            n = None
        self.tokenizer = tokenizer
        self.rows = heldout_rows(validation if validation is not None else train, n or 3, tokenizer.stop_tokens)
        self.before = score_heldout(model, self.rows, tokenizer, adapters=False) if n and self.rows else None
        if self.before is not None:
            print(f"held-out accuracy before training: {self.before.accuracy:.0%} (n={len(self.rows)})")

    def report(self, model: nn.Module) -> None:
        """Score the trained model and print the before/after line and three answers."""
        if self.rows:
            report_heldout(self.before, score_heldout(model, self.rows, self.tokenizer), self.tokenizer)


def _split(tokens: list[int], labels: list[int], stop: set[int]) -> HeldOutRow | None:
    # labels are already shifted (labels[i] is the target after tokens[i]): the answer starts at
    # tokens[first + 1], so the prompt keeps tokens[: first + 1]
    first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), None)
    if first is None:
        return None
    answer = [t for t in tokens[first + 1 :] if t not in stop]
    return HeldOutRow(list(tokens[: first + 1]), answer) if answer else None


def heldout_rows(dataset, n: int, stop_tokens) -> list[HeldOutRow]:
    """The first ``n`` usable rows of a tokenised SFT or preference dataset as questions.

    Args:
        dataset: items with ``tokens``/``labels`` (SFT; KTO rows, the desirable ones only) or
            ``chosen_tokens``/``chosen_labels`` (preference pairs: the chosen answer is the reference).
        n: rows wanted (fewer when the dataset is smaller).
        stop_tokens: the tokenizer's stop ids, dropped from the reference.
    """
    stop = set(stop_tokens)
    rows = []
    for i in range(len(dataset)):
        if len(rows) == n:
            break
        item = dataset[i]
        if item.get("desirable") is False:  # KTO: an undesirable completion is no reference answer
            continue
        key = "chosen_" if "chosen_tokens" in item else ""
        row = _split(item[key + "tokens"], item[key + "labels"], stop)
        if row is not None:
            rows.append(row)
    return rows


def score_heldout(model: nn.Module, rows: list[HeldOutRow], tokenizer, *, adapters: bool = True,
                  whole: int = EXAMPLES) -> HeldOutScore:
    """Greedy answers to ``rows`` and how many match their reference exactly.

    Args:
        model: the model (eval mode is set for the call by ``generate``).
        rows: from :func:`heldout_rows`.
        tokenizer: decodes the answers and gives the stop ids.
        adapters: False scores the base model (LoRA adapters switched off for the call).
        whole: the first rows are generated to the end even when wrong (they are printed);
            the others stop once they cannot match (:func:`_cannot_match`).
    """
    max_new = min(max(len(r.answer) for r in rows) + SLACK_TOKENS, MAX_NEW_TOKENS)
    generated, right = [], []
    with disable_adapters(model) if not adapters else contextlib.nullcontext():
        for i, row in enumerate(rows):
            want = tokenizer.decode(row.answer).strip()
            stop_when = None if i < whole else _cannot_match(row.answer, want, tokenizer)
            out = generate(model, row.prompt, max_new_tokens=max_new, stop_tokens=tokenizer.stop_tokens,
                           stop_when=stop_when)
            generated.append(out)
            right.append(tokenizer.decode_generated(out).strip() == want)
    return HeldOutScore(rows, generated, right)


def _cannot_match(answer: list[int], want: str, tokenizer):
    """``stop_when`` for one row: true once the ids so far can no longer decode to ``want``.

    The ids leaving the reference's ids is not enough (another tokenization of the same text
    still matches), so the text is checked then: it must have left ``want`` too, with no
    partial character at its end (a multi-byte character split across ids decodes to U+FFFD
    until its last byte arrives).
    """

    def stop(out: list[int]) -> bool:
        if out == answer[: len(out)]:
            return False
        text = tokenizer.decode_generated(out).strip()
        return "\ufffd" not in text and not want.startswith(text)

    return stop


def report_heldout(before: HeldOutScore | None, after: HeldOutScore, tokenizer, examples: int = EXAMPLES) -> None:
    """Print the before/after accuracy line (when ``before`` was scored) and the first few
    held-out answers beside their references."""
    if before is not None:
        print(f"held-out accuracy: {before.accuracy:.0%} before -> {after.accuracy:.0%} after "
              f"(n={len(after.rows)}, exact match, greedy)")
    for row, out, right in list(zip(after.rows, after.generated, after.right))[:examples]:
        got, want = tokenizer.decode_generated(out).strip(), tokenizer.decode(row.answer).strip()
        mark = "right" if right else "wrong"
        print(f"  {_clip(_question(row.prompt, tokenizer))!r} -> {_clip(got)!r} (expected {_clip(want)!r}: {mark})")


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _question(prompt: list[int], tokenizer) -> str:
    # the longest stretch of the prompt between special tokens: the user's text, without the
    # chat format's headers and role names around it
    runs, _ = tokenizer.split_at_special(prompt)
    return tokenizer.decode(max(runs, key=len)).strip()
