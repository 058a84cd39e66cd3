"""Batch collation: right-padded batches of samples, and stacked packed rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def padded_collate(
    batch: Sequence[dict], pad_id: int, ignore_index: int = IGNORE_INDEX, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad samples to the longest one in the batch (or to ``pad_to``).

    Args:
        batch: samples ``{"tokens", "labels"}`` (lists or 1-D tensors), optionally with
            ``position_ids`` and ``document_ids`` (then every sample must have them).
        pad_id: token id written into the padding (never trained on: its labels are
            ``ignore_index``).
        ignore_index: label value of padding positions.
        pad_to: pad every batch to this length instead (fixed shapes, e.g. for a CUDA graph);
            must be at least the longest sample.

    Returns:
        ``tokens`` and ``labels`` LongTensors [b, s_max]; ``position_ids`` (continuing past the
        end of each sample) and ``document_ids`` (padding gets an id of its own, so real tokens
        never attend to it) when the samples carry them.
    """
    if not batch:
        raise ValueError("padded_collate: empty batch")
    rows = [{k: _as_list(v) for k, v in sample.items()} for sample in batch]
    s_max = max(len(r["tokens"]) for r in rows)
    if pad_to is not None:
        if s_max > pad_to:
            raise ValueError(f"padded_collate: a sample of {s_max} tokens is longer than pad_to={pad_to}")
        s_max = pad_to
    pad_value = {"tokens": pad_id, "labels": ignore_index}
    out: dict[str, list[list[int]]] = {k: [] for k in rows[0]}
    for r in rows:
        n = s_max - len(r["tokens"])
        for key, seq in r.items():
            if len(seq) != len(r["tokens"]):
                raise ValueError(f"padded_collate: {key} and tokens differ in length")
            if key == "position_ids":
                start = seq[-1] + 1 if seq else 0
                tail = list(range(start, start + n))
            elif key == "document_ids":
                tail = [(max(seq) + 1 if seq else 0)] * n
            elif key in pad_value:
                tail = [pad_value[key]] * n
            else:
                raise ValueError(f"padded_collate: unknown sample key {key!r}")
            out[key].append(seq + tail)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # each [b, s_max]


def packed_collate(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack rows of a ``PackedDataset`` (all exactly ``max_seq_len`` long) into [b, s] tensors.

    Args:
        batch: packed rows with ``tokens, labels, position_ids, document_ids`` (and
            ``num_tokens``, summed over the batch).
    """
    if not batch:
        raise ValueError("packed_collate: empty batch")
    out = {
        k: torch.stack([torch.as_tensor(row[k], dtype=torch.long) for row in batch])  # [b, s]
        for k in batch[0] if k != "num_tokens"
    }
    if "num_tokens" in batch[0]:  # real tokens of the batch (padding tails excluded), an int
        out["num_tokens"] = sum(int(row["num_tokens"]) for row in batch)
    return out
