"""Preference data for DPO-style training: ``{prompt, chosen, rejected}`` records.

Each record becomes two sequences that share the prompt tokens exactly:
``prompt + chosen`` and ``prompt + rejected``, both in the model's chat format
(``tokenizer.tokenize_messages``), with pre-shifted labels as the SFT builders make them
(``labels[i]`` is the target of position ``i``, -100 where not scored): the prompt (and every
chat header) is masked, the responses are scored.

Accepted record shapes (TRL's "standard" and "conversational" preference formats):

* strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` -> one user turn and one
  assistant turn per side;
* message lists: ``{"prompt": [{role, content}, ...], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}``; the prompt must end with a user (or system/tool) turn;
* implicit prompt: no prompt column and chosen/rejected are whole conversations; their longest
  common run of leading messages is the prompt. When a prompt column is given and chosen /
  rejected start with the same messages, that repeated prefix is dropped from them.

Too long pairs: the prompt is always kept whole and each response is cut to fit
``max_seq_len`` (the same rule for both sides). A row whose prompt alone leaves no room for a
response token is skipped as ``fully_masked``. Other skips follow the SFT builders
(``tunelab.data.datasets``): ``malformed`` (missing or mistyped column, unknown role) and
``empty`` (empty prompt or response, or chosen == rejected after truncation: such a pair holds
no preference to learn). Counts are in ``ds.skip_reasons``; ``DataError`` if no row is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunelab.data.collate import padded_collate
from tunelab.data.datasets import (
    IGNORE_INDEX,
    TokenizedDataset,
    _column_map,
    _content_text,
    _rows,
    _Skip,
    converted_rows,
    finish_dataset,
    shift_labels,
)
from tunelab.data.sources import source_name
from tunelab.data.tokenizers import Message
from tunelab.errors import DataError

_ROLES = ("system", "user", "assistant", "ipython", "tool")


class PreferenceDataset(TokenizedDataset):
    """Tokenised preference pairs: ``ds[i] -> {"chosen_tokens", "chosen_labels",
    "rejected_tokens", "rejected_labels"}`` (lists of ints, pre-shifted labels).

    Built by :func:`preference_dataset`. Pair ``i`` is stored as sequences ``2i`` (chosen) and
    ``2i + 1`` (rejected) of the parent's flat arrays; ``name``, ``max_seq_len``, ``pad_id``,
    ``num_skipped``, ``skip_reasons``, ``skip_examples`` and ``describe_skips()`` work as for
    the SFT datasets. ``prompt_lens[i]`` is the number of shared prompt tokens of pair ``i``.
    """

    def __init__(self, name: str, max_seq_len: int, pad_id: int):
        super().__init__(name, max_seq_len, pad_id)
        self.prompt_lens: list[int] = []

    def __len__(self) -> int:
        return (len(self._offsets) - 1) // 2

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        o = self._offsets
        c, r, end = o[2 * i], o[2 * i + 1], o[2 * i + 2]
        return {"chosen_tokens": self._tokens[c:r].tolist(), "chosen_labels": self._labels[c:r].tolist(),
                "rejected_tokens": self._tokens[r:end].tolist(), "rejected_labels": self._labels[r:end].tolist()}

    def seq_lens(self) -> list[int]:
        """Length of the longer side of every pair."""
        o = self._offsets
        return [max(o[2 * i + 1] - o[2 * i], o[2 * i + 2] - o[2 * i + 1]) for i in range(len(self))]


def _messages(value: Any, col: str, default_role: str) -> list[Message]:
    """A string -> one ``default_role`` message; a list of {role, content} -> messages."""
    if isinstance(value, str):
        return [Message(role=default_role, content=value)]
    if not isinstance(value, list):
        raise _Skip("malformed", f"column {col!r} is {type(value).__name__}, expected a string or a message list")
    out = []
    for turn in value:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise _Skip("malformed", f"{col!r} entries need 'role' and 'content'")
        if turn["role"] not in _ROLES:
            raise _Skip("malformed", f"unknown role {turn['role']!r} in {col!r} (known: {list(_ROLES)})")
        out.append(Message(role=turn["role"], content=_content_text(turn["content"])))
    return out


def _split_implicit_prompt(chosen: list[Message], rejected: list[Message]):
    """Longest common run of leading messages = the prompt (TRL's implicit-prompt format)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def check_prompt(prompt: list[Message]) -> None:
    """A prompt must hold text and end with the user's (or system/tool) turn.

    Raises:
        _Skip: ``empty`` or ``malformed``, with the reason.
    """
    if not prompt or not any(m.content.strip() for m in prompt):
        raise _Skip("empty", "empty prompt")
    if prompt[-1].role == "assistant":
        raise _Skip("malformed", "the prompt ends with an assistant turn; it must end with the user's turn")


def prompt_tokens(tokenizer, prompt: list[Message], max_seq_len: int, room_for: str) -> list[int]:
    """The prompt's ids with the assistant's generation header.

    Raises:
        _Skip: ``fully_masked`` when they leave no room in ``max_seq_len`` for ``room_for``.
    """
    ids, _ = tokenizer.tokenize_messages(prompt, add_generation_prompt=True)
    if len(ids) >= max_seq_len:
        raise _Skip("fully_masked", f"the prompt alone is {len(ids)} tokens, no room for {room_for}")
    return ids


def response_tokens(tokenizer, prompt: list[Message], prompt_ids: list[int], response: list[Message],
                    max_seq_len: int) -> tuple[list[int], list[int]]:
    """``prompt + response`` in the chat format, cut to ``max_seq_len``, with pre-shifted labels
    scoring the response only.

    Args:
        tokenizer: the tunelab tokenizer.
        prompt: the prompt messages; ``prompt_ids`` their tokens with the generation header.
        response: the response messages.
        max_seq_len: the longest sequence kept.

    Raises:
        _Skip: the chat format renders the prompt differently inside the whole conversation.
    """
    n_prompt = len(prompt_ids)
    ids, mask = tokenizer.tokenize_messages(prompt + response)
    if ids[:n_prompt] != prompt_ids:  # the chat format must render the prompt the same way
        raise _Skip("malformed", "the chat format does not keep the prompt as a shared prefix")
    mask[:n_prompt] = [True] * n_prompt  # the generation header is prompt, not response
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    return ids, shift_labels(ids, mask)


def preference_dataset(
    tokenizer,
    *,
    source: str | Path,
    max_seq_len: int,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> PreferenceDataset:
    """Preference pairs ``{prompt, chosen, rejected}`` (strings or message lists, see the module
    docstring), tokenised eagerly in the tokenizer's chat format.

    Args:
        tokenizer: a tunelab tokenizer (``load_tokenizer``).
        source: local .json/.jsonl/.parquet file or folder, or a hub dataset id ``org/name``.
        max_seq_len: longest sequence per side; responses are cut to fit, the prompt is kept.
        split: split to read from a folder or hub repo.
        column_map: renames, builder name -> your column, e.g. ``{"prompt": "question"}``.
        data_files: explicit files / glob patterns inside the folder or repo.

    Raises:
        DataError: bad source, unknown column_map key, or no usable row.
    """
    name = source_name(source)
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise DataError(f"dataset {name}: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    cmap = _column_map(column_map, ("prompt", "chosen", "rejected"), name)
    ds = PreferenceDataset(name, max_seq_len, tokenizer.pad_id)

    def convert(row: dict) -> tuple[list[int], list[int], list[int], list[int], int]:
        for key in ("chosen", "rejected"):
            if row.get(cmap[key]) is None:
                raise _Skip("malformed", f"missing column {cmap[key]!r} (columns: {sorted(row)})")
        chosen = _messages(row[cmap["chosen"]], cmap["chosen"], "assistant")
        rejected = _messages(row[cmap["rejected"]], cmap["rejected"], "assistant")
        if row.get(cmap["prompt"]) is not None:
            prompt = _messages(row[cmap["prompt"]], cmap["prompt"], "user")
            # some sets repeat the prompt inside chosen/rejected (HuggingFaceH4/ultrafeedback_binarized)
            chosen, rejected = (msgs[len(prompt):] if msgs[: len(prompt)] == prompt else msgs
                                for msgs in (chosen, rejected))
        elif isinstance(row.get(cmap["chosen"]), list) and isinstance(row.get(cmap["rejected"]), list):
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        else:
            raise _Skip("malformed", f"missing column {cmap['prompt']!r} (columns: {sorted(row)})")
        check_prompt(prompt)
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not any(m.role == "assistant" and m.content.strip() for m in msgs):
                raise _Skip("empty", f"empty {side} response")

        prompt_ids = prompt_tokens(tokenizer, prompt, max_seq_len, "a response")
        n_prompt = len(prompt_ids)
        sides = []
        for msgs in (chosen, rejected):
            sides += response_tokens(tokenizer, prompt, prompt_ids, msgs, max_seq_len)
        if sides[0] == sides[2]:
            raise _Skip("empty", "chosen and rejected are identical" + (" after truncation" if
                        len(sides[0]) == max_seq_len else ""))
        if any(all(x == IGNORE_INDEX for x in labels) for labels in (sides[1], sides[3])):
            raise _Skip("fully_masked", "a response has no scored token after truncation")
        return (*sides, n_prompt)

    for _, (chosen_ids, chosen_labels, rejected_ids, rejected_labels, n_prompt) in converted_rows(
            _rows(source, split, data_files), convert, ds):
        ds._add(chosen_ids, chosen_labels)
        ds._add(rejected_ids, rejected_labels)
        ds.prompt_lens.append(n_prompt)
    return finish_dataset(ds, name, unit="preference pair", units="pairs")


def preference_collate(
    batch: Sequence[dict], pad_id: int, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Batch b pairs as 2b right-padded rows, the b chosen rows first, for ONE forward pass.

    Args:
        batch: items of a :class:`PreferenceDataset`; items that also carry floats
            ``ref_chosen_log_probs`` / ``ref_rejected_log_probs`` (precomputed reference) get
            them stacked the same way.
        pad_id: token id of the padding (its labels are ``ignore_index``).
        ignore_index: label value of padding.

    Returns:
        ``tokens`` and ``labels`` LongTensors [2b, s_max] (rows ``:b`` chosen, ``b:`` rejected),
        ``lengths`` [2b] (each row's tokens before the padding), plus ``ref_log_probs`` fp32
        [2b] when the items carry reference log-probs.
    """
    rows = [{"tokens": s[f"{side}_tokens"], "labels": s[f"{side}_labels"]}
            for side in ("chosen", "rejected") for s in batch]
    out = padded_collate(rows, pad_id, ignore_index)  # [2b, s_max]
    out["lengths"] = torch.tensor([len(r["tokens"]) for r in rows], dtype=torch.long)
    if batch and "ref_chosen_log_probs" in batch[0]:
        ref = [s[f"ref_{side}_log_probs"] for side in ("chosen", "rejected") for s in batch]
        out["ref_log_probs"] = torch.tensor(ref, dtype=torch.float32)  # [2b]
    return out
