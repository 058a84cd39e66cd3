"""Byte-level BPE on tiktoken: Llama 3 ``tokenizer.model`` files (and tokenizer.json, via
``hf_json``).

A Llama 3 tiktoken file has one line per base token, ``base64(token bytes) rank``; the rank
is both the merge priority and the token id. The 256 special tokens are not in the file: they
are appended after the base vocabulary in Llama 3.1 order (``LLAMA3_SPECIAL_TOKENS``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tiktoken

from tunelab.data.tokenizers.base import BaseTokenizer
from tunelab.errors import DataError

# Pre-tokenizer split pattern of Meta's Llama 3 tokenizer.py (cl100k-style: contractions,
# letters with one leading non-letter, digits in groups of at most 3, punctuation runs,
# newlines, other whitespace).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen2.5 / Qwen3's tokenizer.json: Llama 3's regex with single digits
QWEN2_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

NUM_LLAMA3_SPECIAL_TOKENS = 256


def _llama3_special_names() -> list[str]:
    # Llama 3.1 order, spelled as in the HF tokenizer.json of Llama 3.1 (slot 5 is Meta's
    # <|step_id|>, which HF names reserved_special_token_2).
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = [
        f"<|reserved_special_token_{i}|>"
        for i in range(3, 3 + NUM_LLAMA3_SPECIAL_TOKENS - len(named))
    ]
    return named + reserved


LLAMA3_SPECIAL_TOKENS: list[str] = _llama3_special_names()

# tiktoken's BPE slows down on huge pieces (and old versions were quadratic there), so like
# Meta's reference we cut runs of whitespace / non-whitespace longer than this. Only such
# pathological runs can tokenize differently from an uncut encode.
MAX_RUN_CHARS = 25_000
# Long texts are encoded in chunks of about this size, cut only where no split-regex match can
# straddle the cut (between a non-space character and a following " "), so chunking never
# changes the ids.
CHUNK_CHARS = 400_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))
_SAFE_CUT = re.compile(r"(?<=\S) ")


def _split_for_encode(text: str) -> Iterator[str]:
    """Yield pieces of ``text`` whose concatenation is ``text`` and which encode fast."""
    if len(text) <= MAX_RUN_CHARS:
        yield text
        return
    # 1) cut overlong runs every MAX_RUN_CHARS characters (Meta's rule)
    pieces: list[str] = []
    start = 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    # 2) cut long pieces at safe boundaries near every CHUNK_CHARS characters
    for piece in pieces:
        while len(piece) > CHUNK_CHARS:
            m = _SAFE_CUT.search(piece, CHUNK_CHARS)
            if m is None:
                break
            yield piece[: m.start()]
            piece = piece[m.start() :]
        yield piece


class TiktokenTokenizer(BaseTokenizer):
    """Byte-level BPE tokenizer backed by a ``tiktoken.Encoding``.

    Args:
        mergeable_ranks: token bytes -> rank. tiktoken merges the adjacent pair whose
            concatenation has the lowest rank, so ranks must follow merge order.
        pattern: pre-tokenizer split regex.
        special_tokens: special token text -> id (never produced from user text).
        bos_token: text of the BOS special token (or None).
        eos_token: text of the EOS special token.
        pad_token: text of the padding token (None = use ``eos_id``).
        stop_token_names: special tokens that end generation (missing ones are ignored).
        text_tokens: added (non-special) tokens that ARE matched in input text, as HF does.
        rank_to_id: when ranks are not the ids (tokenizer.json whose ids do not follow merge
            order), id of each rank; specials keep their ids.
        chat_format: "llama3" or None.
        path: the source file (for messages).
        chat_template: informational Jinja template.
        prefix_space: prepend " " to text that does not start with one (ByteLevel
            add_prefix_space).
        normalize: optional text normalization applied before encoding.
    """

    def __init__(
        self,
        *,
        mergeable_ranks: dict[bytes, int],
        pattern: str,
        special_tokens: Mapping[str, int],
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        stop_token_names: Sequence[str] = (),
        text_tokens: Iterable[str] = (),
        rank_to_id: Mapping[int, int] | None = None,
        chat_format: str | None = None,
        path: str | None = None,
        chat_template: str | None = None,
        prefix_space: bool = False,
        normalize=None,
    ) -> None:
        self.path = path
        self.chat_template = chat_template
        self.chat_format = chat_format
        self._prefix_space = prefix_space
        self._normalize = normalize
        self.special_tokens = dict(special_tokens)
        self._text_tokens = set(text_tokens)
        self._rank_to_id = dict(rank_to_id) if rank_to_id else None
        self._id_to_rank = (
            {i: r for r, i in self._rank_to_id.items()} if self._rank_to_id else None
        )
        # Special tokens live in the Encoding under their real ids; in the remapped case they
        # are moved past the largest rank so they cannot collide with a base-token rank.
        enc_specials = dict(self.special_tokens)
        if self._rank_to_id is not None:
            top = max(mergeable_ranks.values(), default=-1) + 1
            by_id = sorted(self.special_tokens.items(), key=lambda kv: kv[1])
            for k, (name, sid) in enumerate(by_id):
                enc_specials[name] = top + k
                self._rank_to_id[top + k] = sid
                self._id_to_rank[sid] = top + k
        try:
            self._enc = tiktoken.Encoding(
                name=Path(path).name if path else "tunelab",
                pat_str=pattern,
                mergeable_ranks=mergeable_ranks,
                special_tokens=enc_specials,
            )
        except Exception as e:  # tiktoken raises ValueError / pyo3 errors on bad regexes
            raise DataError(f"cannot build a BPE tokenizer from {path}: {e}") from e
        ids = list(self.special_tokens.values())
        ids += list((self._rank_to_id or mergeable_ranks).values())
        self.vocab_size = max(ids) + 1
        self._special_ids = set(self.special_tokens.values()) - {
            self.special_tokens[t] for t in self._text_tokens
        }
        self._named = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                           ("pad_token", pad_token)) if v is not None}
        self.bos_id = self._lookup(bos_token)
        self.eos_id = self._lookup(eos_token)
        pad = self._lookup(pad_token)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        stops: list[int] = [self.eos_id] if self.eos_id is not None else []
        for name in stop_token_names:
            sid = self.special_tokens.get(name)
            if sid is not None and sid not in stops:
                stops.append(sid)
        self.stop_tokens = stops

    def _lookup(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name in self.special_tokens:
            return self.special_tokens[name]
        ids = self.encode(name, add_bos=False)
        return ids[0] if len(ids) == 1 else None

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise DataError(f"tokenizer {self.path} has no special token {name}") from None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        if self._prefix_space and text and not text.startswith(" "):
            text = " " + text
        ids: list[int] = []
        if add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        for piece in _split_for_encode(text):
            # Special-token text typed by a user ("<|eot_id|>") is encoded as ordinary
            # characters; only plain added tokens (HF special=false) are matched in text.
            if self._text_tokens:
                ranks = self._enc.encode(
                    piece, allowed_special=self._text_tokens, disallowed_special=()
                )
            else:
                ranks = self._enc.encode_ordinary(piece)
            if self._rank_to_id is not None:
                ranks = [self._rank_to_id[r] for r in ranks]
            ids += ranks
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        ranks: list[int] = []
        for piece in _split_for_encode(text):
            ranks += self._enc.encode(piece, allowed_special="all", disallowed_special=())
        lengths = [len(self._enc.decode_single_token_bytes(r)) for r in ranks]
        if self._rank_to_id is not None:
            ranks = [self._rank_to_id[r] for r in ranks]
        return ranks, lengths

    def renders_template(self) -> bool:
        # a normalizer or prefix space would move the ids off the text's byte offsets
        return super().renders_template() and self._normalize is None and not self._prefix_space

    def template_tokens(self) -> dict[str, str]:
        return dict(self._named)

    def special_texts(self) -> list[str]:
        return list(self.special_tokens)

    def special_token_ids(self) -> set[int]:
        return set(self.special_tokens.values())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside [0, {self.vocab_size}) for {self.path}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        if self._id_to_rank is not None:
            ranks = []
            for i in ids:
                r = self._id_to_rank.get(i)
                if r is None:
                    raise ValueError(f"token id {i} is not in the vocabulary of {self.path}")
                ranks.append(r)
        else:
            ranks = ids
        try:
            data = self._enc.decode_bytes(ranks)
        except (KeyError, ValueError):  # a hole in a non-dense rank space
            raise ValueError(
                f"ids contain a token that is not in the vocabulary of {self.path}"
            ) from None
        # Partial UTF-8 sequences (e.g. a truncated generation) become U+FFFD, as in tiktoken.
        return data.decode("utf-8", errors="replace")


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``base64(token) rank`` per line) into token bytes -> rank.

    Raises:
        DataError: a line is not ``base64 integer`` or a token/rank repeats.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read().splitlines()
    ranks: dict[bytes, int] = {}
    n_lines = 0
    try:  # fast path; on any problem, locate the offending line for the message
        for line in raw:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
                n_lines += 1
    except (ValueError, binascii.Error):
        for lineno, line in enumerate(raw, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError
                base64.b64decode(parts[0], validate=True)
                int(parts[1])
            except (ValueError, binascii.Error):
                raise DataError(
                    f"{path} line {lineno} is not 'base64(token) rank'; expected a Llama 3 "
                    "tiktoken tokenizer.model"
                ) from None
    if not ranks:
        raise DataError(f"{path} is empty; expected a Llama 3 tiktoken tokenizer.model")
    if len(ranks) != n_lines or len(set(ranks.values())) != len(ranks):
        raise DataError(f"{path} repeats a token or a rank; the file is corrupt")
    return ranks


def load_llama3_tiktoken(
    path: str | Path, chat_template: str | None = None
) -> TiktokenTokenizer:
    """Load a Llama 3 tiktoken ``tokenizer.model`` with the 256 Llama 3.1 special tokens.

    Special token i gets id ``max_rank + 1 + i`` (= 128000 + i for the real vocabulary).
    BOS = <|begin_of_text|>, EOS = <|end_of_text|>, pad = <|finetune_right_pad_id|>,
    stop tokens = end_of_text, eot_id, eom_id.

    Args:
        path: the tiktoken file.
        chat_template: informational template to keep on the tokenizer.
    """
    ranks = read_tiktoken_file(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"{path} lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); a byte-"
            "level BPE file must contain all 256 bytes"
        )
    base = max(ranks.values()) + 1
    specials = {name: base + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return TiktokenTokenizer(
        mergeable_ranks=ranks,
        pattern=LLAMA3_SPLIT_PATTERN,
        special_tokens=specials,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        stop_token_names=["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
        chat_format="llama3",
        path=str(path),
        chat_template=chat_template,
    )
