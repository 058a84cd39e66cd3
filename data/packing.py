"""Sequence packing: several whole samples per fixed-length row, kept apart by document ids."""

from __future__ import annotations

import random
from array import array
from collections import deque

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class PackedDataset(Dataset):
    """Packing of whole samples into rows of exactly ``max_seq_len`` tokens.

    Samples are taken in order (or in a fixed shuffled order with ``shuffle_seed``); each goes
    into the first of the last ``window`` rows with room for it, else it starts a new row. Rows
    that leave the window are padded. Looking back a few rows instead of only at the newest
    (``window=1``) fills the padding a long sample leaves behind with later short ones: on
    alpaca-like lengths (log-normal, median ~200 of 2048) rows go from ~90% real tokens to ~99%,
    so ~10% less compute is spent on padding, while each row still holds samples from one short
    stretch of the order. Because labels are pre-shifted (each sample's last label is already
    -100), concatenation never trains a document to predict the next one. Each row holds:

    - ``tokens`` [max_seq_len]: the samples back to back, then ``pad_id``;
    - ``labels`` [max_seq_len]: their labels, then -100;
    - ``position_ids`` [max_seq_len]: 0, 1, ... restarting at every document (the padding tail
      counts from 0 as well);
    - ``document_ids`` [max_seq_len]: 0, 1, 2, ... per document within the row; the padding
      tail gets the next id, so attention confined to equal ids keeps documents apart;
    - ``num_tokens`` (0-dim): the row's real tokens (without the padding tail), for tokens/s.

    Only the packing plan (sample indices per row) is stored; rows are built on access.

    Args:
        dataset: samples ``{"tokens", "labels"}`` with pre-shifted labels (e.g. from
            ``instruct_dataset``). A sample longer than ``max_seq_len`` is truncated (its last
            label set to -100); the builders already truncate, so this is a safety net.
        max_seq_len: length of every packed row.
        pad_id: token id for the padding tail; None = ``dataset.pad_id`` (set by the tunelab
            builders from the tokenizer) or 0. Its value never matters for the loss.
        shuffle_seed: pack in a random order drawn from this seed instead of dataset order
            (mixes short and long samples when the dataset is sorted by length).
        window: how many of the newest rows a sample may go into (first fit); 1 = next fit,
            a row closed as soon as a sample does not fit.
    """

    def __init__(
        self,
        dataset,
        max_seq_len: int,
        *,
        pad_id: int | None = None,
        shuffle_seed: int | None = None,
        window: int = 8,
    ):
        if max_seq_len < 1:
            raise ValueError(f"PackedDataset: max_seq_len must be >= 1, got {max_seq_len}")
        if window < 1:
            raise ValueError(f"PackedDataset: window must be >= 1, got {window}")
        self.dataset = dataset
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id if pad_id is not None else getattr(dataset, "pad_id", 0)
        if hasattr(dataset, "seq_lens"):
            lens = dataset.seq_lens()
        else:
            lens = [len(dataset[i]["tokens"]) for i in range(len(dataset))]
        order = list(range(len(lens)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)

        # Plan: row r packs samples _plan[_row_offsets[r]:_row_offsets[r + 1]]. Rows keep the
        # order they were opened in; only the newest `window` ([tokens used, sample indices]) are
        # open, the oldest is written to the plan when a new row pushes it out.
        self._plan = array("q")
        self._row_offsets = [0]
        open_rows: deque[list] = deque()

        def close_oldest() -> None:
            self._plan.extend(open_rows.popleft()[1])
            self._row_offsets.append(len(self._plan))

        for i in order:
            n = min(lens[i], max_seq_len)
            if n == 0:
                continue
            row = next((r for r in open_rows if r[0] + n <= max_seq_len), None)
            if row is None:
                if len(open_rows) == window:
                    close_oldest()
                row = [0, []]
                open_rows.append(row)
            row[0] += n
            row[1].append(i)
        while open_rows:
            close_oldest()
        self.num_tokens = sum(min(n, max_seq_len) for n in lens)

    def __len__(self) -> int:
        return len(self._row_offsets) - 1

    def __getitem__(self, r: int) -> dict[str, torch.Tensor]:
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        tokens: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        docs: list[int] = []
        doc = 0
        for i in self._plan[self._row_offsets[r] : self._row_offsets[r + 1]]:
            sample = self.dataset[i]
            t = list(sample["tokens"])[: self.max_seq_len]
            lab = list(sample["labels"])[: self.max_seq_len]
            lab[-1] = IGNORE_INDEX  # no target across the document boundary (or truncation)
            tokens += t
            labels += lab
            positions += range(len(t))
            docs += [doc] * len(t)
            doc += 1
        n_real = len(tokens)
        n_pad = self.max_seq_len - n_real
        if n_pad:
            tokens += [self.pad_id] * n_pad
            labels += [IGNORE_INDEX] * n_pad
            positions += range(n_pad)
            docs += [doc] * n_pad
        return {
            "tokens": torch.tensor(tokens, dtype=torch.long),  # [max_seq_len]
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "document_ids": torch.tensor(docs, dtype=torch.long),
            "num_tokens": torch.tensor(n_real),
        }

    @property
    def packing_efficiency(self) -> float:
        """Fraction of row positions holding real tokens (1.0 = no padding)."""
        return self.num_tokens / max(1, len(self) * self.max_seq_len)
