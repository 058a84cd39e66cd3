"""preference_dataset / preference_collate with the real tiny Llama-3-format tokenizer (and a
sentencepiece Llama 2 one), plus the generated tiny preference files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.data import load_tokenizer, preference_dataset, shift_labels
from tunelab.data.preference import preference_collate
from tunelab.errors import DataError

from .tiny_tasks import solve

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY / "tokenizer.model")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def expected_pair(tok, prompt_msgs, chosen_msgs, rejected_msgs):
    """Independent expectation: tokenize each full conversation; the prompt (through the
    assistant header) is masked."""
    n_prompt = len(tok.tokenize_messages(prompt_msgs, add_generation_prompt=True)[0])
    out = []
    for msgs in (chosen_msgs, rejected_msgs):
        ids, mask = tok.tokenize_messages(prompt_msgs + msgs)
        mask = [True] * n_prompt + mask[n_prompt:]
        out.append((ids, shift_labels(ids, mask)))
    return out, n_prompt


def test_string_and_message_rows_share_the_prompt_and_mask_it(tmp_path, tok):
    rows = [
        {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "7"},
        {"prompt": [{"role": "user", "content": "Add 2 and 3."}],
         "chosen": [{"role": "assistant", "content": "5"}],
         "rejected": [{"role": "assistant", "content": "7"}]},
        # implicit prompt: whole conversations with a common start (system + user)
        {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                    {"role": "assistant", "content": "5"}],
         "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                      {"role": "assistant", "content": "seven"}]},
        # prompt column AND the prompt repeated inside chosen/rejected
        {"prompt": "Add 2 and 3.",
         "chosen": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
         "rejected": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "7"}]},
    ]
    ds = preference_dataset(tok, source=write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=64)
    assert len(ds) == 4 and ds.num_skipped == 0
    assert ds[3] == ds[0]
    user = [{"role": "user", "content": "Add 2 and 3."}]
    (c, r), n_prompt = expected_pair(tok, user, [{"role": "assistant", "content": "5"}],
                                     [{"role": "assistant", "content": "7"}])
    for i in (0, 1):
        assert (ds[i]["chosen_tokens"], ds[i]["chosen_labels"]) == c
        assert (ds[i]["rejected_tokens"], ds[i]["rejected_labels"]) == r
        assert ds[i]["chosen_tokens"][:n_prompt] == ds[i]["rejected_tokens"][:n_prompt]
        assert ds.prompt_lens[i] == n_prompt
        # scored exactly: the answer tokens and the end-of-turn token
        scored = [t for t in ds[i]["chosen_labels"] if t != -100]
        assert tok.decode(scored) == "5" and scored[-1] == tok.special_id("<|eot_id|>")
    system = [{"role": "system", "content": "Be brief."}] + user
    (c, r), _ = expected_pair(tok, system, [{"role": "assistant", "content": "5"}],
                              [{"role": "assistant", "content": "seven"}])
    assert (ds[2]["chosen_tokens"], ds[2]["chosen_labels"]) == c
    assert (ds[2]["rejected_tokens"], ds[2]["rejected_labels"]) == r


def test_llama2_format_keeps_the_prompt_shared(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["Add two and three. The answer is five or seven."] * 50),
                                   model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok2 = load_tokenizer(tmp_path / "tokenizer.model")
    rows = [{"prompt": "Add two and three.", "chosen": "five", "rejected": "seven"}]
    ds = preference_dataset(tok2, source=write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=64)
    (c, r), n_prompt = expected_pair(tok2, [{"role": "user", "content": "Add two and three."}],
                                     [{"role": "assistant", "content": "five"}],
                                     [{"role": "assistant", "content": "seven"}])
    assert (ds[0]["chosen_tokens"], ds[0]["chosen_labels"]) == c
    assert (ds[0]["rejected_tokens"], ds[0]["rejected_labels"]) == r
    assert tok2.decode(ds[0]["chosen_tokens"][:n_prompt]).endswith("[/INST]")


def test_long_pairs_keep_the_prompt_and_cut_both_responses(tmp_path, tok):
    long_c, long_r = " ".join(["apple"] * 40), " ".join(["apple"] * 39 + ["river"])
    rows = [
        {"prompt": "Repeat apple.", "chosen": long_c, "rejected": "no"},
        {"prompt": "Repeat apple.", "chosen": long_c, "rejected": long_r},  # equal once cut
        {"prompt": "Uppercase: " + " ".join(["garden"] * 60), "chosen": "A", "rejected": "B"},  # prompt too long
    ]
    ds = preference_dataset(tok, source=write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=24)
    assert len(ds) == 1
    assert ds.skip_reasons == {"empty": 1, "fully_masked": 1}
    assert "identical after truncation" in ds.skip_examples["empty"]
    assert "prompt alone" in ds.skip_examples["fully_masked"]
    item, n_prompt = ds[0], ds.prompt_lens[0]
    assert len(item["chosen_tokens"]) == 24 and len(item["rejected_tokens"]) < 24
    assert item["chosen_tokens"][:n_prompt] == item["rejected_tokens"][:n_prompt]
    full_c = tok.tokenize_messages([{"role": "user", "content": "Repeat apple."},
                                    {"role": "assistant", "content": long_c}])[0]
    assert item["chosen_tokens"] == full_c[:24]
    assert item["chosen_labels"][-1] == -100 and item["chosen_labels"][n_prompt - 1] != -100


def test_bad_rows_are_skipped_and_counted(tmp_path, tok, caplog):
    rows = [
        {"prompt": "Add 1 and 1.", "chosen": "2", "rejected": "3"},  # good
        {"prompt": "Add 1 and 1.", "chosen": "2"},  # missing rejected
        {"chosen": "2", "rejected": "3"},  # no prompt and not conversations
        {"prompt": "Add 1 and 1.", "chosen": 2, "rejected": "3"},  # wrong type
        {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "2", "rejected": "3"},  # unknown role
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
         "chosen": "2", "rejected": "3"},  # prompt ends with the assistant
        {"prompt": "Add 1 and 1.", "chosen": "2", "rejected": "2"},  # identical
        {"prompt": "Add 1 and 1.", "chosen": "  ", "rejected": "3"},  # empty response
        {"prompt": "", "chosen": "2", "rejected": "3"},  # empty prompt
        "not json {",
        "[1, 2]",
    ]
    with caplog.at_level("INFO", logger="tunelab"):
        ds = preference_dataset(tok, source=write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=64)
    assert len(ds) == 1
    assert ds.skip_reasons == {"malformed": 7, "empty": 3}
    assert ds.describe_skips() == "7 malformed, 3 empty"
    assert "identical" in " ".join(r.getMessage() for r in caplog.records) or ds.skip_examples
    assert "1 pairs used, 10 skipped" in caplog.text
    with pytest.raises(DataError, match="no usable preference pair.*malformed"):
        preference_dataset(tok, source=write_jsonl(tmp_path / "bad.jsonl", rows[1:]), max_seq_len=64)
    with pytest.raises(DataError, match="no rows found"):
        preference_dataset(tok, source=write_jsonl(tmp_path / "empty.jsonl", []), max_seq_len=64)


def test_column_map(tmp_path, tok):
    rows = [{"question": "Add 1 and 1.", "good": "2", "bad": "3"}]
    ds = preference_dataset(tok, source=write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=64,
                            column_map={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert len(ds) == 1
    with pytest.raises(DataError, match="column_map key 'answer'"):
        preference_dataset(tok, source=tmp_path / "p.jsonl", max_seq_len=64, column_map={"answer": "x"})


def test_collate_stacks_chosen_then_rejected(tmp_path, tok):
    rows = [{"prompt": "Add 1 and 1.", "chosen": "2", "rejected": "three"},
            {"prompt": "Reverse the word 'apple'.", "chosen": "elppa", "rejected": "apple"}]
    ds = preference_dataset(tok, source=write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=64)
    batch = preference_collate([ds[0], ds[1]], pad_id=tok.pad_id)
    s = max(len(ds[i][f"{k}_tokens"]) for i in (0, 1) for k in ("chosen", "rejected"))
    assert batch["tokens"].shape == batch["labels"].shape == (4, s)
    order = [ds[0]["chosen_tokens"], ds[1]["chosen_tokens"], ds[0]["rejected_tokens"], ds[1]["rejected_tokens"]]
    for row, ids in zip(batch["tokens"].tolist(), order):
        assert row[: len(ids)] == ids and all(t == tok.pad_id for t in row[len(ids):])
    assert (batch["labels"][2, len(ds[0]["rejected_tokens"]):] == -100).all()
    with_ref = [dict(ds[i], ref_chosen_log_probs=-1.0 - i, ref_rejected_log_probs=-5.0 - i) for i in (0, 1)]
    out = preference_collate(with_ref, pad_id=tok.pad_id)
    assert out["ref_log_probs"].tolist() == [-1.0, -2.0, -5.0, -6.0]


# ------------------------------------------------------------------------- tiny files
def _records(name):
    return [json.loads(line) for line in (TINY / name).read_text().splitlines()]


def _text(x):
    return x if isinstance(x, str) else x[0]["content"]


def test_tiny_preferences_are_checkable_and_load(tok):
    train, val = _records("preferences.jsonl"), _records("preferences_validation.jsonl")
    assert (len(train), len(val)) == (1000, 100)
    for r in train + val:
        prompt = _text(r["prompt"])
        assert _text(r["chosen"]) == solve(prompt) != _text(r["rejected"])
    assert not {_text(r["prompt"]) for r in train} & {_text(r["prompt"]) for r in val}
    assert sum(isinstance(r["prompt"], list) for r in train) == 250
    ds = preference_dataset(tok, source=TINY / "preferences.jsonl", max_seq_len=128)
    assert len(ds) == 1000 and ds.num_skipped == 0


def test_tiny_preferences_regenerate_identically(tmp_path):
    subprocess.run([sys.executable, str(TINY / "make_preferences.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("preferences.jsonl", "preferences_validation.jsonl"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes()


def test_items_feed_a_forward_pass(tmp_path, tok):
    """Collated rows are model-ready: int64, labels -100 or in-vocab."""
    ds = preference_dataset(tok, source=TINY / "preferences_validation.jsonl", max_seq_len=128)
    batch = preference_collate([ds[i] for i in range(4)], pad_id=tok.pad_id)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape[0] == 8
    labels = batch["labels"]
    assert ((labels == -100) | ((labels >= 0) & (labels < tok.vocab_size))).all()
