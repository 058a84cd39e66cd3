"""SFT dataset builders: alpaca-style instruct, chat (openai / sharegpt) and plain text.

Every builder reads rows from ``source`` (see ``tunelab.data.sources``), turns each row into
tokens + a loss mask, truncates to ``max_seq_len`` and stores the sample with PRE-SHIFTED
labels: ``labels[i]`` is the target for position ``i`` (``tokens[i + 1]``, or -100 where that
token is not trained on) and the last position is -100. The loss is then
``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` with no shift, and
packing several samples is plain concatenation.

Rows that cannot be used are skipped and counted by reason (``ds.skip_reasons``):
``malformed`` (missing keys, wrong types, unknown roles, unparsable lines), ``empty`` (nothing to
train on: empty output/text, no assistant reply), ``fully_masked`` (no trainable label left
after truncation to ``max_seq_len``) and ``template`` (the checkpoint's chat template refused
the conversation, e.g. roles that do not alternate). Each builder logs one summary line on the ``tunelab``
logger and raises ``DataError`` when no row is usable.

Tokenisation is EAGER: the whole dataset is tokenised when the builder is called. That keeps
the code simple and makes the skip counts known before training starts; samples are kept in
flat int32 arrays (8 bytes per token for tokens + labels), fine up to a few hundred million
tokens.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from tunelab.data.sources import MalformedRow, iter_rows, resolve_data_files, source_name
from tunelab.data.tokenizers import Message
from tunelab.data.tokenizers.chat_template import ChatTemplateError
from tunelab.errors import DataError

log = logging.getLogger("tunelab")

IGNORE_INDEX = -100

_REASON_TEXT = {
    "malformed": "malformed",
    "empty": "empty",
    "fully_masked": "fully masked after truncation to {max_seq_len} tokens",
    "template": "refused by the chat template",
}


class _Skip(Exception):
    """Raised by a row converter: the row is skipped for ``reason`` (a key of _REASON_TEXT)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def shift_labels(tokens: list[int], mask: list[bool]) -> list[int]:
    """Pre-shifted labels: ``labels[i] = tokens[i + 1]`` unless ``mask[i + 1]``; last is -100.

    Args:
        tokens: token ids of one sample.
        mask: same length; True = the token is NOT trained on (prompt side).
    """
    labels = [IGNORE_INDEX if m else t for t, m in zip(tokens[1:], mask[1:])]
    labels.append(IGNORE_INDEX)
    return labels


class TokenizedDataset(Dataset):
    """A tokenised SFT dataset: ``ds[i] -> {"tokens": list[int], "labels": list[int]}``.

    Built by the ``*_dataset`` builders (eagerly tokenised). Attributes: ``name`` (source name
    for logs), ``max_seq_len``, ``pad_id`` (the tokenizer's, used by packing), ``num_skipped``,
    ``skip_reasons`` (reason -> count, reasons ``malformed`` / ``empty`` / ``fully_masked`` / ``template``)
    and ``skip_examples`` (reason -> first offending row's description).
    """

    def __init__(self, name: str, max_seq_len: int, pad_id: int):
        self.name = name
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self._tokens = array("i")
        self._labels = array("i")
        self._offsets = [0]
        self.skip_reasons: dict[str, int] = {}
        self.skip_examples: dict[str, str] = {}

    # -- building ------------------------------------------------------------------------
    def _add(self, tokens: list[int], labels: list[int]) -> None:
        self._tokens.extend(tokens)
        self._labels.extend(labels)
        self._offsets.append(len(self._tokens))

    def _skip(self, reason: str, detail: str) -> None:
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
        self.skip_examples.setdefault(reason, detail)

    # -- reading -------------------------------------------------------------------------
    @property
    def num_skipped(self) -> int:
        return sum(self.skip_reasons.values())

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self._offsets[i], self._offsets[i + 1]
        return {"tokens": self._tokens[a:b].tolist(), "labels": self._labels[a:b].tolist()}

    def seq_lens(self) -> list[int]:
        """Length of every sample (without materialising them)."""
        o = self._offsets
        return [o[i + 1] - o[i] for i in range(len(self))]

    def describe_skips(self) -> str:
        order = list(_REASON_TEXT)
        parts = [
            f"{n} {_REASON_TEXT[r].format(max_seq_len=self.max_seq_len)}"
            for r, n in sorted(self.skip_reasons.items(), key=lambda kv: order.index(kv[0]))
        ]
        return ", ".join(parts)


def _build(
    name: str,
    rows: Iterable[Any],
    convert: Callable[[dict], tuple[list[int], list[bool]]],
    *,
    max_seq_len: int,
    pad_id: int,
) -> TokenizedDataset:
    """Run ``convert`` over rows, truncate, shift labels, count skips, log one line."""
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"dataset {name}: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    ds = TokenizedDataset(name, max_seq_len, pad_id)
    for rowno, (tokens, mask) in converted_rows(rows, convert, ds):
        tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
        labels = shift_labels(tokens, mask)
        if all(x == IGNORE_INDEX for x in labels):
            ds._skip("fully_masked", f"row {rowno}: {len(tokens)} tokens, none trained on")
            continue
        ds._add(tokens, labels)
    return finish_dataset(ds, name, unit="row", units="rows")


def converted_rows(rows: Iterable[Any], convert: Callable[[dict], Any], ds) -> Iterator[tuple[int, Any]]:
    """``(row number, convert(row))`` for each row that converts; malformed rows, non-objects and
    rows ``convert`` rejects (``_Skip``) are counted on ``ds`` with the first example of each.

    Args:
        rows: the source's rows (``MalformedRow`` for lines that did not parse).
        convert: row dict -> whatever the builder needs; raises ``_Skip`` for a bad row.
        ds: the dataset being built (``_skip(reason, detail)``).
    """
    for rowno, row in enumerate(rows, 1):
        if isinstance(row, MalformedRow):
            ds._skip("malformed", f"{row.where}: {row.reason}")
            continue
        if not isinstance(row, dict):
            ds._skip("malformed", f"row {rowno}: expected an object, got {type(row).__name__}")
            continue
        try:
            yield rowno, convert(row)
        except _Skip as s:
            ds._skip(s.reason, f"row {rowno}: {s.detail}")
        except ChatTemplateError as e:
            ds._skip("template", f"row {rowno}: {e}")


def finish_dataset(ds, name: str, *, unit: str, units: str):
    """The end of every builder: a ``DataError`` if no row was usable, else one log line.

    Args:
        ds: the built dataset (``len``, skip counts and examples).
        name: the source's name for messages.
        unit, units: what one / several usable items are called ("row"/"rows", or
            "preference pair"/"pairs").

    Raises:
        DataError: nothing usable, naming how many rows were skipped and why.
    """
    if len(ds) == 0:
        if not ds.skip_reasons:
            raise DataError(f"dataset {name}: no rows found (empty file or split)")
        examples = "; ".join(ds.skip_examples.values())
        raise DataError(
            f"dataset {name}: no usable {unit}, {ds.num_skipped} skipped ({ds.describe_skips()}); "
            f"first problems: {examples}"
        )
    summary = f"dataset {name}: {len(ds)} {units} used, {ds.num_skipped} skipped"
    if ds.num_skipped:
        summary += f" ({ds.describe_skips()})"
    log.info(summary)
    for reason, detail in ds.skip_examples.items():
        log.debug("dataset %s: first %s row: %s", name, reason, detail)
    return ds


def _column_map(column_map: dict[str, str] | None, known: tuple[str, ...], name: str) -> dict:
    cmap = {k: k for k in known}
    for key, col in (column_map or {}).items():
        if key not in known:
            raise DataError(
                f"dataset {name}: column_map key {key!r} is not one of {list(known)} "
                "(keys are the builder's names, values your dataset's column names)"
            )
        cmap[key] = col
    return cmap


def _rows(source, split, data_files):
    return iter_rows(resolve_data_files(source, split, data_files))


def _str_field(row: dict, col: str, *, required: bool) -> str:
    if col not in row or row[col] is None:
        if required:
            raise _Skip("malformed", f"missing column {col!r} (columns: {sorted(row)})")
        return ""
    value = row[col]
    if not isinstance(value, str):
        raise _Skip("malformed", f"column {col!r} is {type(value).__name__}, expected a string")
    return value


# ---------------------------------------------------------------------------------------------
# Builders


def instruct_dataset(
    tokenizer,
    *,
    source: str | Path,
    max_seq_len: int,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    train_on_input: bool = False,
    data_files: str | list[str] | None = None,
) -> TokenizedDataset:
    """Alpaca-style records ``{instruction, input, output}`` as one user/assistant exchange.

    The user message is ``instruction`` followed by a blank line and ``input`` when ``input``
    is non-empty (``input`` may be missing or null); the assistant message is ``output``. Both
    go through ``tokenizer.tokenize_messages`` (the model's chat format). Tokenised eagerly.

    Args:
        tokenizer: a tunelab tokenizer (``load_tokenizer``).
        source: local .json/.jsonl/.parquet file or folder, or a hub dataset id ``org/name``.
        max_seq_len: samples are truncated to this many tokens.
        split: split to read from a folder or hub repo.
        column_map: renames, builder name -> your column, e.g. ``{"output": "response"}``.
        train_on_input: also train on the prompt (user turn) tokens.
        data_files: explicit files / glob patterns inside the folder or repo.

    Raises:
        DataError: bad source, unknown column_map key, or no usable row.
    """
    name = source_name(source)
    cmap = _column_map(column_map, ("instruction", "input", "output"), name)
    user_masked = False if train_on_input else None

    def convert(row: dict) -> tuple[list[int], list[bool]]:
        instruction = _str_field(row, cmap["instruction"], required=True)
        inp = _str_field(row, cmap["input"], required=False)
        output = _str_field(row, cmap["output"], required=True)
        prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        if not prompt.strip():
            raise _Skip("empty", "empty instruction")
        if not output.strip():
            raise _Skip("empty", "empty output")
        messages = [
            Message(role="user", content=prompt, masked=user_masked),
            Message(role="assistant", content=output),
        ]
        return tokenizer.tokenize_messages(messages)

    return _build(
        name, _rows(source, split, data_files), convert, max_seq_len=max_seq_len,
        pad_id=tokenizer.pad_id,
    )


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system", "user", "assistant"}


def _content_text(content: Any) -> str:
    # OpenAI content may be a list of parts; only text parts are supported.
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _Skip("malformed", f"message content is {type(content).__name__}, expected a string")


def _parse_turns(turns: Any, col: str, role_key: str, text_key: str, roles: dict) -> list:
    if not isinstance(turns, list):
        raise _Skip("malformed", f"column {col!r} is {type(turns).__name__}, expected a list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise _Skip("malformed", f"{col!r} entries need {role_key!r} and {text_key!r}")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise _Skip("malformed", f"unknown role {turn[role_key]!r} (known: {sorted(roles)})")
        out.append((role, _content_text(turn[text_key])))
    return out


def chat_dataset(
    tokenizer,
    *,
    source: str | Path,
    max_seq_len: int,
    split: str = "train",
    conversation_style: str = "auto",
    column_map: dict[str, str] | None = None,
    train_on_input: bool = False,
    data_files: str | list[str] | None = None,
) -> TokenizedDataset:
    """Multi-turn conversations: openai ``{messages: [{role, content}]}`` or sharegpt
    ``{conversations: [{from: human|gpt|system, value}]}``. Tokenised eagerly.

    Only assistant turns are trained on unless ``train_on_input`` (then every turn is).

    Args:
        tokenizer: a tunelab tokenizer (``load_tokenizer``).
        source: local .json/.jsonl/.parquet file or folder, or a hub dataset id ``org/name``.
        max_seq_len: samples are truncated to this many tokens.
        split: split to read from a folder or hub repo.
        conversation_style: ``"openai"``, ``"sharegpt"`` or ``"auto"`` (per row: openai when
            the row has the messages column, else sharegpt).
        column_map: renames, e.g. ``{"messages": "dialog"}`` or ``{"conversations": "conv"}``.
        train_on_input: also train on system/user turns.
        data_files: explicit files / glob patterns inside the folder or repo.

    Raises:
        DataError: bad source or style, unknown column_map key, or no usable row.
    """
    name = source_name(source)
    if conversation_style not in ("auto", "openai", "sharegpt"):
        raise DataError(
            f"dataset {name}: conversation_style {conversation_style!r} is not one of "
            "auto, openai, sharegpt"
        )
    cmap = _column_map(column_map, ("messages", "conversations"), name)
    openai_roles = {r: r for r in _OPENAI_ROLES}
    other = False if train_on_input else None

    def convert(row: dict) -> tuple[list[int], list[bool]]:
        style = conversation_style
        if style == "auto":
            if cmap["messages"] in row:
                style = "openai"
            elif cmap["conversations"] in row:
                style = "sharegpt"
            else:
                raise _Skip(
                    "malformed",
                    f"no {cmap['messages']!r} or {cmap['conversations']!r} column "
                    f"(columns: {sorted(row)})",
                )
        if style == "openai":
            col = cmap["messages"]
            if col not in row:
                raise _Skip("malformed", f"missing column {col!r} (columns: {sorted(row)})")
            turns = _parse_turns(row[col], col, "role", "content", openai_roles)
        else:
            col = cmap["conversations"]
            if col not in row:
                raise _Skip("malformed", f"missing column {col!r} (columns: {sorted(row)})")
            turns = _parse_turns(row[col], col, "from", "value", _SHAREGPT_ROLES)
        if not any(role == "assistant" and text.strip() for role, text in turns):
            raise _Skip("empty", "no non-empty assistant turn to train on")
        # masked=None keeps the tokenizer's default (assistant trained, header masked);
        # masked=False trains the whole turn, header included.
        messages = [
            Message(role=role, content=text, masked=None if role == "assistant" else other)
            for role, text in turns
        ]
        return tokenizer.tokenize_messages(messages)

    return _build(
        name, _rows(source, split, data_files), convert, max_seq_len=max_seq_len,
        pad_id=tokenizer.pad_id,
    )


def text_completion_dataset(
    tokenizer,
    *,
    source: str | Path,
    max_seq_len: int,
    split: str = "train",
    column: str = "text",
    data_files: str | list[str] | None = None,
) -> TokenizedDataset:
    """Plain text for continued pre-training: ``bos + text + eos``, every token trained.

    A text longer than ``max_seq_len`` is truncated (the rest is dropped, and so is its eos).
    Tokenised eagerly.

    Args:
        tokenizer: a tunelab tokenizer (``load_tokenizer``).
        source: local .json/.jsonl/.parquet file or folder, or a hub dataset id ``org/name``.
        max_seq_len: samples are truncated to this many tokens.
        split: split to read from a folder or hub repo.
        column: the column holding the text.
        data_files: explicit files / glob patterns inside the folder or repo.

    Raises:
        DataError: bad source or no usable row.
    """
    name = source_name(source)

    def convert(row: dict) -> tuple[list[int], list[bool]]:
        text = _str_field(row, column, required=True)
        if not text.strip():
            raise _Skip("empty", "empty text")
        tokens = tokenizer.encode(text, add_bos=True, add_eos=True)
        return tokens, [False] * len(tokens)

    return _build(
        name, _rows(source, split, data_files), convert, max_seq_len=max_seq_len,
        pad_id=tokenizer.pad_id,
    )
