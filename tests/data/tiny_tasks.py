"""An independent solver for the packaged tiny word tasks (checks the generated answers)."""

from __future__ import annotations


def solve(question: str) -> str:
    """The right answer to ``"<task>: <words>"`` (the tiny set's one prompt shape)."""
    task, _, text = question.partition(": ")
    words = text.split()
    answers = {"Say the first word": words[:1], "Say the last word": words[-1:], "Repeat the words": words,
               "Reverse the order of the words": words[::-1], "Uppercase the words": text.upper().split()}
    if task not in answers or not words:
        raise AssertionError(f"unknown task: {question}")
    return " ".join(answers[task])
