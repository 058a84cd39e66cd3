"""padded_collate / packed_collate."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.collate import packed_collate, padded_collate


def test_padded_collate_right_pads():
    batch = [
        {"tokens": [5, 6, 7], "labels": [6, 7, -100]},
        {"tokens": [8], "labels": [-100]},
        {"tokens": torch.tensor([9, 10]), "labels": torch.tensor([10, -100])},
    ]
    out = padded_collate(batch, pad_id=0)
    assert set(out) == {"tokens", "labels"}
    assert out["tokens"].dtype == torch.long and out["labels"].dtype == torch.long
    assert out["tokens"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["labels"].tolist() == [[6, 7, -100], [-100, -100, -100], [10, -100, -100]]


def test_padded_collate_pad_to_fixed_length():
    batch = [{"tokens": [5, 6], "labels": [6, -100]}, {"tokens": [8], "labels": [9]}]
    out = padded_collate(batch, pad_id=0, pad_to=4)
    assert out["tokens"].tolist() == [[5, 6, 0, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[6, -100, -100, -100], [9, -100, -100, -100]]
    with pytest.raises(ValueError, match="longer than pad_to=1"):
        padded_collate(batch, pad_id=0, pad_to=1)


def test_padded_collate_custom_ignore_index_and_pad():
    out = padded_collate([{"tokens": [1], "labels": [3]}, {"tokens": [1, 2], "labels": [2, 3]}],
                         pad_id=7, ignore_index=-1)
    assert out["tokens"].tolist() == [[1, 7], [1, 2]]
    assert out["labels"].tolist() == [[3, -1], [2, 3]]


def test_padded_collate_packed_keys():
    batch = [
        {"tokens": [1, 2, 3], "labels": [2, -100, -100], "position_ids": [0, 1, 0],
         "document_ids": [0, 0, 1]},
        {"tokens": [4], "labels": [-100], "position_ids": [0], "document_ids": [0]},
    ]
    out = padded_collate(batch, pad_id=0)
    assert out["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2]]
    # Padding is a document of its own so no real token can attend to it.
    assert out["document_ids"].tolist() == [[0, 0, 1], [0, 1, 1]]


def test_padded_collate_rejects_ragged_sample():
    with pytest.raises(ValueError, match="labels"):
        padded_collate([{"tokens": [1, 2], "labels": [2]}], pad_id=0)


def test_packed_collate_stacks():
    rows = [
        {k: torch.arange(4) + i for k in ("tokens", "labels", "position_ids", "document_ids")}
        for i in range(3)
    ]
    out = packed_collate(rows)
    assert set(out) == {"tokens", "labels", "position_ids", "document_ids"}
    assert out["tokens"].shape == (3, 4) and out["tokens"].dtype == torch.long
    assert out["labels"][2].tolist() == [2, 3, 4, 5]
