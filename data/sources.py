"""Where dataset rows come from: local .json/.jsonl/.parquet files, folders, hub dataset repos.

``resolve_data_files(source, split, data_files)`` turns a config's ``source`` into a sorted list
of local files; ``iter_rows(files)`` streams their rows one at a time (a JSON-lines or parquet
file is never loaded whole; a ``.json`` list is parsed once). A line that is not valid JSON
yields a ``MalformedRow`` instead of stopping the run, so the builders can count it as skipped.

Split selection (hub repos and local folders), following the hub's file naming conventions:
a file belongs to a split when a word of its relative path (words are separated by ``/ - _ .``
and digits) names that split (``train-00000-of-00001.parquet``, ``data/train.jsonl``,
``validation/part0.json``; ``valid``/``val``/``dev`` mean validation, ``eval`` means test).
Any other split name (``train_sft``) must appear between delimiters in the path. If no file
names any split, all files form the ``train`` split. Split layouts declared only in a hub
README's ``configs:`` block are not read: pass ``data_files=`` for those. ``data_files=`` skips
split selection and uses exactly the files (or glob patterns) given, relative to the folder
or repo.
"""

from __future__ import annotations

import codecs
import fnmatch
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import DataError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")

# Word in a file path -> split it names (the hub's conventions, lower-cased).
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
# Metadata files that hub dataset repos carry next to the data; never rows.
_METADATA_NAMES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class MalformedRow:
    """Stands in for a row that could not be parsed (the builders count it as malformed)."""

    where: str
    reason: str


def looks_like_repo_id(source: str) -> bool:
    """True for ``org/name`` strings that are not file names (``data/alpaca.json`` is a path)."""
    return bool(_REPO_ID.match(source)) and not source.lower().endswith(DATA_SUFFIXES)


def source_name(source: str | Path) -> str:
    """Short name for log lines and errors: the file or folder name, or the repo id."""
    s = str(source)
    path = Path(s).expanduser()
    if path.exists():
        return path.name or s
    return s


def resolve_data_files(
    source: str | Path,
    split: str = "train",
    data_files: str | list[str] | None = None,
) -> list[Path]:
    """Return the local data files for ``source`` and ``split``, in sorted order.

    Args:
        source: a local ``.json``/``.jsonl``/``.parquet`` file, a folder of them (searched
            recursively, hidden folders skipped), or a hub dataset repo id ``org/name`` (only
            when no such local path exists; downloaded with ``huggingface_hub``).
        split: which split to read from a folder or repo (see the module docstring). Ignored
            for a single file.
        data_files: explicit file names or glob patterns relative to the folder or repo; when
            given, split selection is skipped.

    Raises:
        DataError: missing path, no data files, no files for the split, or a failed download.
    """
    s = str(source)
    path = Path(s).expanduser()
    if path.is_file():
        if data_files is not None:
            raise DataError(
                f"dataset {s}: data_files= needs a folder or hub repo as source, not a file"
            )
        _check_suffix(path)
        return [path]
    if path.is_dir():
        root = path
    elif looks_like_repo_id(s):
        root = _download_repo(s, data_files)
    else:
        raise DataError(
            f"dataset source {s!r} not found: give an existing .json/.jsonl/.parquet file or "
            "folder, or a hub dataset id like 'org/name'"
        )
    files = _list_data_files(root)
    if data_files is not None:
        return _match_data_files(root, files, data_files, s)
    if not files:
        raise DataError(f"dataset {s}: no .json/.jsonl/.parquet files in {root}")
    return _files_for_split(root, files, split, s)


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(
            f"dataset file {path}: unsupported type {path.suffix!r}; use .json, .jsonl or .parquet"
        )


def _download_repo(repo_id: str, data_files: str | list[str] | None) -> Path:
    import huggingface_hub  # lazy: only hub sources need it

    if data_files is None:
        patterns = [f"*{suffix}" for suffix in DATA_SUFFIXES]  # fnmatch's * also matches "/"
    else:
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    try:
        local = huggingface_hub.snapshot_download(
            repo_id=repo_id, repo_type="dataset", allow_patterns=patterns
        )
    except Exception as e:  # network, auth, missing repo: all reach the user as one line
        if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            raise DataError(
                f"dataset {repo_id}: no such dataset repo on the hub, or it is private/gated "
                "(set HF_TOKEN); or give a local file or folder"
            ) from e
        raise DataError(
            f"dataset {repo_id}: could not download the hub dataset repo ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the id, HF_TOKEN and network, "
            "or give a local file"
        ) from e
    return Path(local)


def _list_data_files(root: Path) -> list[Path]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # .cache/, .git/, hidden files
            continue
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and p.name not in _METADATA_NAMES:
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _match_data_files(
    root: Path, files: list[Path], data_files: str | list[str], source: str
) -> list[Path]:
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    chosen = []
    for pattern in patterns:
        hits = [f for f in files if fnmatch.fnmatch(f.relative_to(root).as_posix(), pattern)]
        if not hits:
            raise DataError(f"dataset {source}: data_files entry {pattern!r} matches no data file")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def _split_of(rel: str) -> set[str]:
    words = re.split(r"[-._/ 0-9]+", rel.lower())
    return {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}


def _files_for_split(root: Path, files: list[Path], split: str, source: str) -> list[Path]:
    want = _SPLIT_WORDS.get(split.lower(), split.lower())
    rels = {f: f.relative_to(root).as_posix().lower() for f in files}
    if want not in _SPLIT_WORDS.values():
        # A custom split name (e.g. train_sft): the name itself between delimiters.
        pattern = re.compile(rf"(?:^|[-._/ ]){re.escape(want)}(?:[-._/ 0-9]|$)")
        chosen = [f for f, rel in rels.items() if pattern.search(rel)]
        if chosen:
            return chosen
    named = {f: _split_of(rel) for f, rel in rels.items()}
    chosen = [f for f, splits in named.items() if want in splits]
    if chosen:
        return chosen
    if not any(named.values()):
        if want == "train":
            return files
        raise DataError(
            f"dataset {source}: no files for split {split!r} (file names name no split, so all "
            "files are the 'train' split); use split=train or data_files="
        )
    found = sorted(set().union(*named.values()))
    raise DataError(f"dataset {source}: no files for split {split!r}; splits found: {found}")


# ---------------------------------------------------------------------------------------------
# Row readers


def iter_rows(files: list[Path]) -> Iterator[dict | MalformedRow | object]:
    """Stream rows from ``files`` in order (dicts normally; anything else is a malformed row)."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _iter_parquet(path)
        elif suffix == ".jsonl":
            yield from _iter_json_lines(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        else:
            _check_suffix(path)


def _iter_json_lines(path: Path) -> Iterator[object]:
    # bytes, decoded line by line: one bad byte or a runaway nesting costs that row, not the file
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # a UTF-8 BOM some editors write
            if not raw.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                yield json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield MalformedRow(where, "not UTF-8 text")
            except json.JSONDecodeError as e:
                yield MalformedRow(where, f"invalid JSON ({e.msg})")
            except RecursionError:
                yield MalformedRow(where, "JSON nested too deeply")


def _first_line(path: Path) -> str:
    """The file's first non-blank line, BOM dropped (undecodable bytes replaced: only for telling
    the layout apart)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return next((line for line in f if line.strip()), "")


def _load_whole_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"dataset file {path}: invalid JSON at line {e.lineno} ({e.msg}); expected a "
            "JSON list of records or JSON lines (one record per line)"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"dataset file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8, or as JSON lines "
                        "so that a bad row is skipped instead") from None
    except RecursionError:
        raise DataError(f"dataset file {path}: JSON nested too deeply to read") from None


def _iter_json(path: Path) -> Iterator[object]:
    # A .json file holds a JSON list of records, JSON lines, or one (pretty-printed) record.
    first_line = _first_line(path)
    if not first_line:
        return
    if first_line.lstrip()[0] == "[":
        yield from _load_whole_json(path)  # parsed once; json needs the whole list anyway
        return
    try:
        json.loads(first_line)
    except (json.JSONDecodeError, RecursionError):
        yield _load_whole_json(path)  # one multi-line record
        return
    yield from _iter_json_lines(path)


def _iter_parquet(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq  # lazy: optional dependency
    except ImportError as e:
        raise DataError(
            f"dataset file {path}: reading parquet needs pyarrow: pip install tunelab[parquet]"
        ) from e
    import pyarrow

    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"dataset file {path}: not a readable parquet file ({' '.join(str(e).split())[:160]})") from None
    for batch in pf.iter_batches(batch_size=1024):
        yield from batch.to_pylist()
