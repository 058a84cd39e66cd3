"""SFT builders: formats, column_map, masking, pre-shifted labels, truncation, skipped rows.

Most tests use ``FakeTokenizer``: one id per byte and a visible header layout, so expected
tokens and masks can be written out by hand. The last tests repeat the key checks with the
real Llama 3 tiktoken tokenizer from the tiny assets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tunelab.data import (
    Message,
    chat_dataset,
    instruct_dataset,
    load_tokenizer,
    padded_collate,
    text_completion_dataset,
)
from tunelab.errors import DataError

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"


class FakeTokenizer:
    """ids: 0 pad, 1 bos, 2 eos, 3 header, 4 eot, 5/6/7 system/user/assistant, 10 + byte."""

    pad_id, bos_id, eos_id, header_id, eot_id = 0, 1, 2, 3, 4
    role_ids = {"system": 5, "user": 6, "assistant": 7}
    vocab_size = 266

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [10 + b for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def tokenize_messages(self, messages, add_generation_prompt=False):
        ids, mask = [self.bos_id], [True]
        for m in messages:
            masked = m.masked if m.masked is not None else m.role != "assistant"
            head = [self.header_id, self.role_ids[m.role]]
            body = self.encode(m.content, add_bos=False) + [self.eot_id]
            ids += head + body
            mask += [m.masked is not False] * len(head) + [masked] * len(body)
        return ids, mask


def enc(text):
    return FakeTokenizer().encode(text, add_bos=False)


def expected(parts):
    """parts: [(ids, trained)] -> (tokens, pre-shifted labels)."""
    tokens = [t for ids, _ in parts for t in ids]
    trained = [tr for ids, tr in parts for _ in ids]
    labels = [t if tr else -100 for t, tr in zip(tokens[1:], trained[1:])] + [-100]
    return tokens, labels


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def tok():
    return FakeTokenizer()


# ------------------------------------------------------------------------------ instruct


def test_instruct_masks_exactly_the_prompt(tmp_path, tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    ds = instruct_dataset(tok, source=src, max_seq_len=64)
    assert len(ds) == 1 and ds.num_skipped == 0 and ds.skip_reasons == {}
    tokens, labels = expected([
        ([1, 3, 6], False), (enc("Add\n\n1 2") + [4], False), ([3, 7], False),
        (enc("3") + [4], True),
    ])
    assert ds[0] == {"tokens": tokens, "labels": labels}
    # Pre-shifted: labels[i] is tokens[i + 1] wherever it is trained; last position -100.
    assert labels[-1] == -100
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert [tokens[i + 1] for i in trained] == enc("3") + [4]


def test_instruct_train_on_input_and_missing_input(tmp_path, tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "ok"}])
    ds = instruct_dataset(tok, source=src, max_seq_len=64, train_on_input=True)
    tokens, labels = ds[0]["tokens"], ds[0]["labels"]
    assert tokens == [1, 3, 6] + enc("Hi") + [4, 3, 7] + enc("ok") + [4]
    # The user turn (header included) is trained; BOS is never a target and the assistant
    # header stays prompt (the tokenizer's rule for assistant turns).
    assert labels == expected([
        ([1], False), ([3, 6] + enc("Hi") + [4], True), ([3, 7], False), (enc("ok") + [4], True),
    ])[1]


def test_instruct_column_map(tmp_path, tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"question": "Q?", "context": "", "answer": "A"}])
    ds = instruct_dataset(
        tok, source=src, max_seq_len=64,
        column_map={"instruction": "question", "input": "context", "output": "answer"},
    )
    assert ds[0]["tokens"] == [1, 3, 6] + enc("Q?") + [4, 3, 7] + enc("A") + [4]
    with pytest.raises(DataError, match="column_map key 'outptu'"):
        instruct_dataset(tok, source=src, max_seq_len=64, column_map={"outptu": "answer"})


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    rows = [
        good,
        {"instruction": "no output"},                          # malformed: missing key
        {"instruction": "x", "input": "", "output": 5},        # malformed: wrong type
        "{broken json",                                         # malformed: bad line
        '["not", "an", "object"]',                             # malformed: not a dict
        {"instruction": "x", "input": "", "output": "   "},    # empty output
        {"instruction": "A long prompt " * 10, "output": "y"},  # fully masked after truncation
        good,
    ]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        ds = instruct_dataset(tok, source=src, max_seq_len=40)
    assert len(ds) == 2
    assert ds.skip_reasons == {"malformed": 4, "empty": 1, "fully_masked": 1}
    assert ds.num_skipped == 6
    assert (
        "dataset mixed.jsonl: 2 rows used, 6 skipped (4 malformed, 1 empty, 1 fully masked "
        "after truncation to 40 tokens)"
    ) in caplog.messages


def test_all_bad_rows_is_a_data_error_naming_source_and_reasons(tmp_path, tok):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}] * 3)
    with pytest.raises(DataError, match=r"bad.jsonl: no usable row, 3 skipped \(3 malformed\).*"
                                         r"missing column 'instruction'"):
        instruct_dataset(tok, source=src, max_seq_len=64)


def test_empty_file_is_a_data_error(tmp_path, tok):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no rows found"):
        instruct_dataset(tok, source=src, max_seq_len=64)


def test_truncation_keeps_a_partial_answer(tmp_path, tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "abcdefghij"}])
    full = instruct_dataset(tok, source=src, max_seq_len=512)[0]
    cut = instruct_dataset(tok, source=src, max_seq_len=12)[0]
    assert len(full["tokens"]) == 18 and len(cut["tokens"]) == 12
    assert cut["tokens"] == full["tokens"][:12]
    assert cut["labels"] == full["labels"][:11] + [-100]


def test_single_row_json_list_and_parquet_sources(tmp_path, tok):
    rows = [{"instruction": f"Echo {i}", "input": "", "output": str(i)} for i in range(3)]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    a = instruct_dataset(tok, source=tmp_path / "l.json", max_seq_len=64)
    b = instruct_dataset(tok, source=str(tmp_path / "p.parquet"), max_seq_len=64)
    assert [a[i] for i in range(3)] == [b[i] for i in range(3)]


# ------------------------------------------------------------------------------ chat


def test_chat_openai_and_sharegpt_give_the_same_samples(tmp_path, tok):
    openai = {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": [{"type": "text", "text": "A2"}]},
    ]}
    sharegpt = {"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "U1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "U2"},
        {"from": "gpt", "value": "A2"},
    ]}
    src = write_jsonl(tmp_path / "chat.jsonl", [openai, sharegpt])  # auto-detected per row
    ds = chat_dataset(tok, source=src, max_seq_len=128)
    assert len(ds) == 2 and ds[0] == ds[1]
    tokens, labels = expected([
        ([1, 3, 5], False), (enc("S") + [4], False), ([3, 6], False), (enc("U1") + [4], False),
        ([3, 7], False), (enc("A1") + [4], True), ([3, 6], False), (enc("U2") + [4], False),
        ([3, 7], False), (enc("A2") + [4], True),
    ])
    assert ds[0] == {"tokens": tokens, "labels": labels}
    forced = chat_dataset(tok, source=src, max_seq_len=128, conversation_style="sharegpt")
    assert len(forced) == 1 and forced.skip_reasons == {"malformed": 1}


def test_chat_train_on_input_column_map_and_bad_rows(tmp_path, tok):
    rows = [
        {"dialog": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        {"dialog": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "A"}]},
        {"dialog": [{"role": "user", "content": "only a question"}]},
        {"dialog": "not a list"},
        {"other": []},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    ds = chat_dataset(tok, source=src, max_seq_len=64, column_map={"messages": "dialog"},
                      train_on_input=True)
    assert len(ds) == 1
    assert ds.skip_reasons == {"malformed": 3, "empty": 1}
    assert ds[0]["labels"] == expected([
        ([1], False), ([3, 6] + enc("U") + [4], True), ([3, 7], False), (enc("A") + [4], True),
    ])[1]
    with pytest.raises(DataError, match="conversation_style 'chatml'"):
        chat_dataset(tok, source=src, max_seq_len=64, conversation_style="chatml")


# ------------------------------------------------------------------------------ text


def test_text_completion_trains_all_tokens(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello"}, {"body": ""}, {"text": "x"}])
    ds = text_completion_dataset(tok, source=src, max_seq_len=64, column="body")
    assert len(ds) == 1 and ds.skip_reasons == {"empty": 1, "malformed": 1}
    tokens = [1] + enc("hello") + [2]
    assert ds[0] == {"tokens": tokens, "labels": tokens[1:] + [-100]}
    cut = text_completion_dataset(tok, source=src, max_seq_len=4, column="body")[0]
    assert cut == {"tokens": tokens[:4], "labels": tokens[1:4] + [-100]}


def test_dataset_feeds_padded_collate(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}, {"text": "hello"}])
    ds = text_completion_dataset(tok, source=src, max_seq_len=64)
    batch = padded_collate([ds[0], ds[1]], pad_id=tok.pad_id)
    assert batch["tokens"].shape == (2, 7)
    assert batch["labels"][0].tolist()[-4:] == [-100] * 4


# ------------------------------------------------------------------------------ real tokenizer


@pytest.fixture(scope="module")
def llama3_tok():
    return load_tokenizer(TINY / "tokenizer.model")


def test_real_tokenizer_instruct_masks_prompt(tmp_path, llama3_tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 37 and 48.", "output": "85"}])
    ds = instruct_dataset(llama3_tok, source=src, max_seq_len=64)
    sample = ds[0]
    ids, mask = llama3_tok.tokenize_messages(
        [Message("user", "Add 37 and 48."), Message("assistant", "85")]
    )
    assert sample["tokens"] == ids
    assert sample["labels"] == [t if not m else -100 for t, m in zip(ids[1:], mask[1:])] + [-100]
    trained = [t for t in sample["labels"] if t != -100]
    eot = llama3_tok.special_id("<|eot_id|>")
    assert trained == llama3_tok.encode("85", add_bos=False) + [eot]
    assert ds.pad_id == llama3_tok.pad_id


def test_real_tokenizer_chat_and_text(tmp_path, llama3_tok):
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"conversations": [{"from": "human", "value": "Reverse the word 'planet'."},
                           {"from": "gpt", "value": "tenalp"}]},
    ])
    ds = chat_dataset(llama3_tok, source=src, max_seq_len=64)
    eot = llama3_tok.special_id("<|eot_id|>")
    assert [t for t in ds[0]["labels"] if t != -100] == (
        llama3_tok.encode("tenalp", add_bos=False) + [eot]
    )
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "Sort these numbers: 5 2 9"}])
    ds = text_completion_dataset(llama3_tok, source=src, max_seq_len=64)
    tokens = ds[0]["tokens"]
    assert tokens[0] == llama3_tok.bos_id and tokens[-1] == llama3_tok.eos_id
    assert llama3_tok.decode(tokens) == "Sort these numbers: 5 2 9"


def test_public_api():
    import tunelab.data as data

    for name in ("load_tokenizer", "Message", "instruct_dataset", "chat_dataset",
                 "text_completion_dataset", "PackedDataset", "padded_collate", "packed_collate"):
        assert name in data.__all__ and hasattr(data, name), name


def test_bad_bytes_bom_and_nesting_cost_a_row_not_the_file(tmp_path, tok):
    """A UTF-8 BOM is accepted; a line with a non-UTF-8 byte and a line nested past the JSON
    parser's recursion limit are skipped and counted with file:line, the rest trains."""
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}).encode()
    src = tmp_path / "dirty.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n'
                    + b"[" * 100_000 + b"\n" + good + b"\n")
    ds = instruct_dataset(tok, source=src, max_seq_len=64)
    assert len(ds) == 2 and ds.skip_reasons == {"malformed": 2}
    assert ds.skip_examples["malformed"] == "dirty.jsonl:2: not UTF-8 text"
    # a .json list with a BOM loads; one that is not UTF-8 is one line naming the file
    (tmp_path / "list.json").write_bytes(b"\xef\xbb\xbf[" + good + b"]")
    assert len(instruct_dataset(tok, source=tmp_path / "list.json", max_seq_len=64)) == 1
    (tmp_path / "bad.json").write_bytes(b"[" + good[:-1] + b', "x": "\xff"}]')
    with pytest.raises(DataError, match="bad.json: not UTF-8 text") as info:
        instruct_dataset(tok, source=tmp_path / "bad.json", max_seq_len=64)
    assert "\n" not in str(info.value)


def test_a_file_that_only_claims_to_be_parquet_is_one_line(tmp_path, tok):
    (tmp_path / "fake.parquet").write_text("instruction,output\nhi,there\n")
    with pytest.raises(DataError, match="fake.parquet: not a readable parquet file") as info:
        instruct_dataset(tok, source=tmp_path / "fake.parquet", max_seq_len=64)
    assert "\n" not in str(info.value)
