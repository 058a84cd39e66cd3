"""PackedDataset: layout of packed rows, and loss equivalence with unpacked documents."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tunelab.data.collate import packed_collate
from tunelab.data.packing import PackedDataset


def make_sample(rng: random.Random, n: int, vocab: int = 50, n_prompt: int = 0) -> dict:
    """Random document with pre-shifted labels; the first n_prompt targets are masked."""
    tokens = [rng.randrange(3, vocab) for _ in range(n)]
    labels = tokens[1:] + [-100]
    labels = [-100 if i < n_prompt else t for i, t in enumerate(labels)]
    return {"tokens": tokens, "labels": labels}


def test_next_fit_layout():
    rng = random.Random(0)
    samples = [make_sample(rng, n) for n in (3, 4, 2, 5, 1)]
    packed = PackedDataset(samples, max_seq_len=8, pad_id=0, window=1)
    assert len(packed) == 2  # [3, 4] + 1 pad, then [2, 5, 1] exactly full
    r0, r1 = packed[0], packed[1]
    for row in (r0, r1):
        assert all(v.shape == (8,) and v.dtype == torch.long for k, v in row.items() if k != "num_tokens")
    assert (int(r0["num_tokens"]), int(r1["num_tokens"])) == (7, 8)  # real tokens, the pad tail excluded
    s = samples
    assert r0["tokens"].tolist() == s[0]["tokens"] + s[1]["tokens"] + [0]
    assert r0["labels"].tolist() == s[0]["labels"] + s[1]["labels"] + [-100]
    assert r0["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert r0["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]  # padding: own id
    assert r1["tokens"].tolist() == s[2]["tokens"] + s[3]["tokens"] + s[4]["tokens"]
    assert r1["position_ids"].tolist() == [0, 1, 0, 1, 2, 3, 4, 0]
    assert r1["document_ids"].tolist() == [0, 0, 1, 1, 1, 1, 1, 2]
    assert packed.packing_efficiency == pytest.approx(15 / 16)


def test_window_fills_an_older_row_first():
    rng = random.Random(0)
    samples = [make_sample(rng, n) for n in (3, 4, 2, 5, 1, 6)]
    packed = PackedDataset(samples, max_seq_len=8, pad_id=0, window=2)
    # 3+4 -> row 0; 2 opens row 1; 5 joins row 1; 1 fits row 0 again (the first with room);
    # 6 opens row 2, which pushes row 0 out of the window of 2.
    s = samples
    assert len(packed) == 3
    assert packed[0]["tokens"].tolist() == s[0]["tokens"] + s[1]["tokens"] + s[4]["tokens"]
    assert packed[0]["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert packed[1]["tokens"].tolist() == s[2]["tokens"] + s[3]["tokens"] + [0]
    assert packed[2]["tokens"].tolist() == s[5]["tokens"] + [0, 0]
    assert [int(packed[r]["num_tokens"]) for r in range(3)] == [8, 7, 6]


def test_window_packs_alpaca_like_lengths_tighter_than_next_fit():
    rng = random.Random(0)
    lens = [min(max(int(rng.lognormvariate(5.3, 0.7)), 40), 2048) for _ in range(3000)]  # median ~200

    class Lengths:  # only the lengths matter to the plan
        def __len__(self):
            return len(lens)

        def seq_lens(self):
            return lens

    next_fit = PackedDataset(Lengths(), 2048, window=1).packing_efficiency
    default = PackedDataset(Lengths(), 2048)
    assert next_fit < 0.92 and default.packing_efficiency > 0.98
    plan = sorted(default._plan.tolist())
    assert plan == list(range(len(lens)))  # every sample once


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window must be >= 1"):
        PackedDataset([], 8, window=0)


def test_every_sample_once_and_no_label_crosses_documents():
    rng = random.Random(1)
    samples = [make_sample(rng, rng.randint(1, 20)) for _ in range(60)]
    packed = PackedDataset(samples, max_seq_len=32, shuffle_seed=3)
    seen = []
    for row in packed:
        docs, labels = row["document_ids"], row["labels"]
        assert row["tokens"].shape == (32,)
        # The last position of every document is never a target.
        boundary = torch.cat([docs[1:] != docs[:-1], torch.tensor([True])])
        assert (labels[boundary] == -100).all()
        for d in docs.unique().tolist():
            seen.append(tuple(row["tokens"][docs == d].tolist()))
    real = sorted(tuple(s["tokens"]) for s in samples)
    # Padding tails appear as extra (pad-only) documents; drop them before comparing.
    assert sorted(t for t in seen if set(t) != {0}) == real


def test_shuffle_seed_is_deterministic():
    rng = random.Random(2)
    samples = [make_sample(rng, rng.randint(1, 10)) for _ in range(30)]
    a = PackedDataset(samples, 16, shuffle_seed=7)
    b = PackedDataset(samples, 16, shuffle_seed=7)
    assert [r["tokens"].tolist() for r in a] == [r["tokens"].tolist() for r in b]
    c = PackedDataset(samples, 16)
    assert [r["tokens"].tolist() for r in a] != [r["tokens"].tolist() for r in c]


def test_long_sample_truncated_and_pad_id_from_dataset():
    class DS(list):
        pad_id = 9

    rng = random.Random(3)
    ds = DS([make_sample(rng, 12), make_sample(rng, 2)])
    packed = PackedDataset(ds, max_seq_len=8)
    assert len(packed) == 2
    assert packed[0]["tokens"].tolist() == ds[0]["tokens"][:8]
    assert packed[0]["labels"].tolist() == ds[0]["labels"][:7] + [-100]
    assert packed[1]["tokens"].tolist() == ds[1]["tokens"] + [9] * 6


def test_dataloader_with_packed_collate():
    rng = random.Random(4)
    samples = [make_sample(rng, rng.randint(2, 9)) for _ in range(20)]
    packed = PackedDataset(samples, 16)
    loader = DataLoader(packed, batch_size=3, collate_fn=packed_collate)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (3, 16)
    assert set(batch) == {"tokens", "labels", "position_ids", "document_ids", "num_tokens"}
    assert batch["num_tokens"] == sum(int(packed[i]["num_tokens"]) for i in range(3))


def test_packed_loss_equals_unpacked_per_document():
    """A packed row gives each document exactly the loss it has alone (fp32; tolerance 1e-5
    covers only the different summation order of the masked softmax)."""
    from tunelab.models.llama import build_model, tiny

    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=64, max_seq_len=64)).eval()
    rng = random.Random(5)
    docs = [make_sample(rng, n, vocab=64, n_prompt=p) for n, p in ((7, 2), (11, 0), (5, 3), (9, 4))]
    packed = PackedDataset(docs, max_seq_len=40)
    assert len(packed) == 1
    row = packed_collate([packed[0]])
    with torch.no_grad():
        logits = model(row["tokens"], position_ids=row["position_ids"],
                       document_ids=row["document_ids"])  # [1, 40, vocab]
        per_token = F.cross_entropy(logits[0], row["labels"][0], ignore_index=-100,
                                    reduction="none")
        for d, doc in enumerate(docs):
            alone_logits = model(torch.tensor([doc["tokens"]]))[0]
            alone = F.cross_entropy(alone_logits, torch.tensor(doc["labels"]),
                                    ignore_index=-100, reduction="sum")
            in_pack = per_token[row["document_ids"][0] == d].sum()
            torch.testing.assert_close(in_pack, alone, rtol=1e-5, atol=1e-5)
        # And the row's mean loss equals the mean over all unpacked trainable tokens.
        n_trained = sum(sum(l != -100 for l in doc["labels"]) for doc in docs)
        assert int((row["labels"] != -100).sum()) == n_trained
