"""Prompt-only rows for online RL (GRPO): ``{prompt, ...}``, the completions are sampled.

``prompt`` is a string (one user turn) or a message list ending with a user (or system/tool)
turn, rendered in the model's chat format with the assistant's generation header appended.
Every other column of the row is kept as it is (``answer``, say) and handed to the reward
functions by name, with the prompt as the row gave it (TRL's convention). A prompt longer than
``max_seq_len`` leaves no room to generate and is skipped as ``fully_masked``; malformed rows
are skipped and counted as in the SFT builders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.datasets import IGNORE_INDEX, TokenizedDataset, _column_map, _rows, _Skip, converted_rows, finish_dataset
from tunelab.data.preference import _messages, check_prompt, prompt_tokens
from tunelab.data.sources import source_name
from tunelab.errors import DataError

__all__ = ["PromptDataset", "prompt_dataset"]


class PromptDataset(TokenizedDataset):
    """Tokenised prompts: ``ds[i] -> {"prompt_ids", "prompt", "fields"}`` (the ids with the
    generation header, the prompt as the row gave it, the row's other columns)."""

    def __init__(self, name: str, max_seq_len: int, pad_id: int):
        super().__init__(name, max_seq_len, pad_id)
        self.prompts: list[Any] = []
        self.fields: list[dict[str, Any]] = []

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i < 0:
            i += len(self)
        return {"prompt_ids": item["tokens"], "prompt": self.prompts[i], "fields": self.fields[i]}


def prompt_dataset(
    tokenizer,
    *,
    source: str | Path,
    max_seq_len: int,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> PromptDataset:
    """Prompt rows ``{prompt, <any other columns>}``, tokenised eagerly (module docstring).

    Args:
        tokenizer: a tunelab tokenizer (``load_tokenizer``).
        source: local .json/.jsonl/.parquet file or folder, or a hub dataset id ``org/name``.
        max_seq_len: the longest prompt kept (generation adds ``max_completion_len`` after it).
        split: split to read from a folder or hub repo.
        column_map: ``{"prompt": your column}``.
        data_files: explicit files / glob patterns inside the folder or repo.

    Raises:
        DataError: bad source, unknown column_map key, or no usable row.
    """
    name = source_name(source)
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"dataset {name}: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    col = _column_map(column_map, ("prompt",), name)["prompt"]
    ds = PromptDataset(name, max_seq_len, tokenizer.pad_id)

    def convert(row: dict) -> tuple[list[int], Any, dict]:
        if row.get(col) is None:
            raise _Skip("malformed", f"missing column {col!r} (columns: {sorted(row)})")
        messages = _messages(row[col], col, "user")
        check_prompt(messages)
        ids = prompt_tokens(tokenizer, messages, max_seq_len, "a completion")
        return ids, row[col], {k: v for k, v in row.items() if k != col}

    for _, (ids, prompt, fields) in converted_rows(_rows(source, split, data_files), convert, ds):
        ds._add(ids, [IGNORE_INDEX] * len(ids))
        ds.prompts.append(prompt)
        ds.fields.append(fields)
    return finish_dataset(ds, name, unit="prompt", units="prompts")
