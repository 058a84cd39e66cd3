"""Unpaired preference data for KTO: ``{prompt, completion, label}`` rows, ``label`` true for a
desirable completion and false for an undesirable one (TRL's unpaired preference format).

Paired rows ``{prompt, chosen, rejected}`` are accepted too and unpaired as TRL does: each
gives a desirable row (chosen) and an undesirable one (rejected). Prompts and completions are
strings or message lists, rendered in the model's chat format as the preference builder does
(``tunelab.data.preference``): the prompt is masked, the completion scored, a too long
completion is cut to ``max_seq_len``.

KTO estimates the KL term of its loss from mismatched pairs: :func:`kto_collate` adds, for a
micro-batch of b rows, b more rows pairing prompt i with the completion of row i - 1 (cyclic),
TRL's rotation, so the mismatched completions are the same set as the batch's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tunelab.data.collate import padded_collate
from tunelab.data.datasets import IGNORE_INDEX, TokenizedDataset, _column_map, _rows, _Skip, converted_rows, finish_dataset
from tunelab.data.preference import _messages, check_prompt, prompt_tokens, response_tokens
from tunelab.data.sources import source_name
from tunelab.errors import DataError

__all__ = ["KTODataset", "kto_collate", "kto_dataset"]


class KTODataset(TokenizedDataset):
    """Tokenised KTO rows: ``ds[i] -> {"tokens", "labels", "prompt_len", "desirable"}``.

    Built by :func:`kto_dataset`; the skip counts work as for the SFT datasets.
    """

    def __init__(self, name: str, max_seq_len: int, pad_id: int):
        super().__init__(name, max_seq_len, pad_id)
        self.prompt_lens: list[int] = []
        self.desirable: list[bool] = []

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i < 0:
            i += len(self)
        return {**item, "prompt_len": self.prompt_lens[i], "desirable": self.desirable[i]}


def kto_dataset(
    tokenizer,
    *,
    source: str | Path,
    max_seq_len: int,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> KTODataset:
    """KTO rows ``{prompt, completion, label}`` (or preference pairs, unpaired), tokenised eagerly.

    Args:
        tokenizer: a tunelab tokenizer (``load_tokenizer``).
        source: local .json/.jsonl/.parquet file or folder, or a hub dataset id ``org/name``.
        max_seq_len: longest sequence; completions are cut to fit, the prompt is kept.
        split: split to read from a folder or hub repo.
        column_map: renames, builder name -> your column, e.g. ``{"completion": "answer"}``
            (names: prompt, completion, label, chosen, rejected).
        data_files: explicit files / glob patterns inside the folder or repo.

    Raises:
        DataError: bad source, unknown column_map key, or no usable row.
    """
    name = source_name(source)
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"dataset {name}: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    cmap = _column_map(column_map, ("prompt", "completion", "label", "chosen", "rejected"), name)
    ds = KTODataset(name, max_seq_len, tokenizer.pad_id)

    def convert(row: dict) -> list[tuple[list[int], list[int], int, bool]]:
        if row.get(cmap["prompt"]) is None:
            raise _Skip("malformed", f"missing column {cmap['prompt']!r} (columns: {sorted(row)})")
        if row.get(cmap["completion"]) is not None:
            label = row.get(cmap["label"])
            if not isinstance(label, bool):
                raise _Skip("malformed", f"column {cmap['label']!r} must be true or false, got {label!r}")
            completions = [(row[cmap["completion"]], cmap["completion"], label)]
        elif row.get(cmap["chosen"]) is not None and row.get(cmap["rejected"]) is not None:
            completions = [(row[cmap["chosen"]], cmap["chosen"], True), (row[cmap["rejected"]], cmap["rejected"], False)]
        else:
            raise _Skip("malformed", f"need {cmap['completion']!r} + {cmap['label']!r} (or {cmap['chosen']!r} + "
                                     f"{cmap['rejected']!r}); columns: {sorted(row)}")
        prompt = _messages(row[cmap["prompt"]], cmap["prompt"], "user")
        check_prompt(prompt)
        prompt_ids = prompt_tokens(tokenizer, prompt, max_seq_len, "a completion")
        out = []
        for value, col, desirable in completions:
            response = _messages(value, col, "assistant")
            if not any(m.role == "assistant" and m.content.strip() for m in response):
                raise _Skip("empty", f"empty {col}")
            ids, labels = response_tokens(tokenizer, prompt, prompt_ids, response, max_seq_len)
            out.append((ids, labels, len(prompt_ids), desirable))
        return out

    for _, rows in converted_rows(_rows(source, split, data_files), convert, ds):
        for ids, labels, n_prompt, desirable in rows:
            ds._add(ids, labels)
            ds.prompt_lens.append(n_prompt)
            ds.desirable.append(desirable)
    return finish_dataset(ds, name, unit="row", units="rows")


def kto_collate(batch: Sequence[dict], pad_id: int, max_seq_len: int,
                ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """b KTO rows as 2b right-padded rows for the policy and reference passes: the rows
    themselves, then the mismatched (KL) rows, prompt i + the completion of row i - 1.

    Args:
        batch: items of a :class:`KTODataset`.
        pad_id: the padding token id.
        max_seq_len: the KL rows are cut to this length like the rows themselves.
        ignore_index: label value of unscored positions.

    Returns:
        ``tokens``, ``labels`` [2b, s] (rows ``:b`` matched, ``b:`` KL), ``lengths`` [2b]
        (before padding), ``desirable`` bool [b].
    """
    rows = [{"tokens": s["tokens"], "labels": s["labels"]} for s in batch]
    for i, s in enumerate(batch):
        other = batch[i - 1]  # cyclic: row 0 takes the last row's completion
        p, q = s["prompt_len"], other["prompt_len"]
        tokens = s["tokens"][:p] + other["tokens"][q:]
        labels = [ignore_index] * (p - 1) + other["labels"][q - 1:]  # pre-shifted: label t scores token t + 1
        rows.append({"tokens": tokens[:max_seq_len], "labels": labels[:max_seq_len]})
    out = padded_collate(rows, pad_id, ignore_index)
    out["lengths"] = torch.tensor([len(r["tokens"]) for r in rows], dtype=torch.long)
    out["desirable"] = torch.tensor([s["desirable"] for s in batch], dtype=torch.bool)
    return out
