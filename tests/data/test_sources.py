"""Row sources: json list / JSON lines / folders / parquet / hub repos, split selection, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tunelab.data.sources import (
    MalformedRow,
    iter_rows,
    looks_like_repo_id,
    resolve_data_files,
)
from tunelab.errors import DataError

ROWS = [{"text": f"row {i}", "n": i} for i in range(5)]


def rows_of(source, split="train", data_files=None):
    return list(iter_rows(resolve_data_files(source, split, data_files)))


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_json_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS, indent=2))
    assert rows_of(p) == ROWS


def test_json_lines_with_json_suffix_and_blank_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert rows_of(str(p)) == ROWS


def test_json_single_pretty_record_and_long_lines(tmp_path):
    p = tmp_path / "one.json"
    record = {"messages": [{"role": "user", "content": "hi"}]}
    p.write_text(json.dumps(record, indent=2))
    assert rows_of(p) == [record]  # one record, not its inner list
    long_rows = [{"text": "x" * 10_000}, {"text": "y"}]  # first line longer than any peek
    p = tmp_path / "long.json"
    p.write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    assert rows_of(p) == long_rows


def test_invalid_json_list_is_a_data_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"a": 1},\n {"a": ]')
    with pytest.raises(DataError, match="bad.json: invalid JSON at line 2"):
        rows_of(p)


def test_jsonl_bad_line_becomes_malformed_row(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    rows = rows_of(p)
    assert rows[0] == ROWS[0] and rows[2] == ROWS[1]
    assert isinstance(rows[1], MalformedRow) and rows[1].where == "d.jsonl:2"


def test_parquet(tmp_path):
    p = write_parquet(tmp_path / "d.parquet", ROWS)
    assert rows_of(p) == ROWS


def test_parquet_without_pyarrow_is_a_data_error(tmp_path, monkeypatch):
    p = write_parquet(tmp_path / "d.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DataError, match=r"pip install tunelab\[parquet\]"):
        rows_of(p)


def test_folder_sorted_mixed_types_skips_hidden(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[2:4])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    write_parquet(tmp_path / "sub" / "c.parquet", ROWS[4:])
    write_jsonl(tmp_path / ".cache" / "z.jsonl", [{"hidden": True}])
    (tmp_path / "README.md").write_text("not data")
    assert rows_of(tmp_path) == ROWS


def test_folder_split_selection(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", ROWS[2:4])
    write_jsonl(tmp_path / "data" / "validation-00000-of-00001.jsonl", ROWS[4:])
    assert rows_of(tmp_path) == ROWS[:4]
    assert rows_of(tmp_path, split="validation") == ROWS[4:]
    with pytest.raises(DataError, match=r"no files for split 'test'.*validation"):
        rows_of(tmp_path, split="test")


def test_split_synonyms_and_folders(tmp_path):
    write_jsonl(tmp_path / "train" / "part0.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "dev.jsonl", ROWS[3:])
    assert rows_of(tmp_path, split="train") == ROWS[:3]
    assert rows_of(tmp_path, split="validation") == ROWS[3:]


def test_custom_split_name(tmp_path):
    write_jsonl(tmp_path / "data" / "train_sft-00000-of-00001.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "data" / "test_sft-00000-of-00001.jsonl", ROWS[2:3])
    write_jsonl(tmp_path / "data" / "train_gen-00000-of-00001.jsonl", ROWS[3:])
    assert rows_of(tmp_path, split="train_sft") == ROWS[:2]
    assert rows_of(tmp_path, split="test_sft") == ROWS[2:3]
    assert rows_of(tmp_path, split="train") == ROWS[3:] + ROWS[:2]  # both train_* files


def test_unnamed_files_are_the_train_split(tmp_path):
    write_jsonl(tmp_path / "alpaca.jsonl", ROWS)
    assert rows_of(tmp_path) == ROWS
    with pytest.raises(DataError, match="split 'validation'"):
        rows_of(tmp_path, split="validation")


def test_data_files_override(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "extra" / "more.jsonl", ROWS[2:])
    assert rows_of(tmp_path, data_files="extra/*.jsonl") == ROWS[2:]
    assert rows_of(tmp_path, data_files=["extra/more.jsonl", "train.jsonl"]) == ROWS[2:] + ROWS[:2]
    with pytest.raises(DataError, match="nothing.jsonl"):
        rows_of(tmp_path, data_files="nothing.jsonl")


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "alpaca.json"
    with pytest.raises(DataError, match="alpaca.json"):
        rows_of(missing)
    with pytest.raises(DataError, match="not found"):
        rows_of("data/alpaca.jsonl")  # relative, looks like a path (suffix), not a repo id


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported type '.csv'"):
        rows_of(p)


def test_repo_id_detection():
    assert looks_like_repo_id("tatsu-lab/alpaca")
    assert looks_like_repo_id("org/name.v2")
    assert not looks_like_repo_id("alpaca")
    assert not looks_like_repo_id("data/alpaca.json")
    assert not looks_like_repo_id("/abs/path")
    assert not looks_like_repo_id("a/b/c")


def jsonl_text(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet_bytes(tmp_path, rows) -> bytes:
    return write_parquet(tmp_path / "tmp.parquet", rows).read_bytes()


def test_hub_repo_parquet_splits(tmp_path, fake_hub):
    fake_hub.add_repo("org/name", {
        "data/train-00000-of-00001.parquet": parquet_bytes(tmp_path, ROWS[:3]),
        "data/test-00000-of-00001.parquet": parquet_bytes(tmp_path, ROWS[3:]),
        "README.md": "card",
        "dataset_infos.json": "{}",
    }, repo_type="dataset")
    assert rows_of("org/name") == ROWS[:3]
    assert rows_of("org/name", split="test") == ROWS[3:]
    fetched = [p for m, p, _ in fake_hub.requests if "/resolve/" in p]
    assert fetched and all(p.startswith("/datasets/org/name/") for p in fetched)
    assert not any(p.endswith("README.md") for p in fetched)  # only data files downloaded


def test_hub_repo_jsonl_and_data_files(fake_hub):
    fake_hub.add_repo("org/chat", {
        "data/train.jsonl": jsonl_text(ROWS[:2]),
        "extra.jsonl": jsonl_text(ROWS[2:]),
    }, repo_type="dataset")
    assert rows_of("org/chat") == ROWS[:2]
    assert rows_of("org/chat", data_files="extra.jsonl") == ROWS[2:]


def test_hub_failure_is_a_data_error(fake_hub):
    with pytest.raises(DataError, match="org/missing: no such dataset repo"):
        rows_of("org/missing")
