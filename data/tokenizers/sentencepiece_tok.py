"""Llama 2 style sentencepiece ``tokenizer.model`` (a SentencePiece ModelProto)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from tunelab.data.tokenizers.base import BaseTokenizer
from tunelab.errors import DataError


# ModelProto piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def proto_fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message, in order.

    Only the wire types sentencepiece uses are needed: varint (0), 64-bit (1), bytes (2),
    32-bit (5). Values are ints, raw bytes for type 2, raw 4/8 bytes for the fixed types.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def piece_types(path: str | Path) -> list[int]:
    """The type of every piece, read from the ModelProto (sentencepiece's Python API cannot
    tell user-defined pieces, such as Gemma's <start_of_turn>, from normal ones)."""
    types = []
    for number, _, value in proto_fields(Path(path).read_bytes()):
        if number == 1:  # ModelProto.pieces: SentencePiece{piece=1, score=2, type=3}
            types.append(next((v for n, _, v in proto_fields(value) if n == 3), NORMAL))
    return types


class SentencePieceTokenizer(BaseTokenizer):
    """Thin wrapper over ``sentencepiece.SentencePieceProcessor``.

    Whole strings are passed to sentencepiece, so ids are exactly the library's (its dummy
    prefix "▁" is added once per ``encode`` call, as in Meta's Llama 2 code). Control-token
    text such as "<s>" in user input is encoded as plain text, which is sentencepiece's own
    behaviour for control symbols. Chats: the checkpoint's chat template where one is present
    (``encode_rendered``), else the built-in Llama 2 ``[INST]`` format.

    ``pad_id`` is the model's pad piece when it has one, else 0 (``<unk>`` in Llama 2, which
    has no pad piece): padded positions carry label -100, so the id only needs to be valid.

    Args:
        path: the ``tokenizer.model`` file.
        chat_template: the Jinja template from tokenizer_config.json, rendered for chats.
        legacy: tokenizer_config.json's ``legacy`` (how transformers puts the "▁" prefix on
            text after a special token in a rendered template; see ``encode_rendered``).
        added_tokens: tokens past the model's pieces, text -> id (Phi-3's ``<|user|>``,
            ``<|end|>``... from tokenizer.json / added_tokens.json): special tokens of the chat
            template; typed into plain text they stay text, like control pieces.
        bos_token, eos_token: tokenizer_config.json's, where they name another token than the
            model's own BOS/EOS pieces (Phi-3.5's eos_token is the added ``<|endoftext|>``).

    Raises:
        DataError: the file is not a sentencepiece model or lacks BOS/EOS pieces.
    """

    def __init__(self, path: str | Path, chat_template: str | None = None, legacy: bool = False,
                 added_tokens: dict[str, int] | None = None, bos_token: str | None = None,
                 eos_token: str | None = None) -> None:
        self.path = str(path)
        self.chat_template = chat_template
        self.chat_format = "llama2"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on bad protobufs
            raise DataError(
                f"{path} is not a valid sentencepiece model ({type(e).__name__}); expected a "
                "Llama 2 tokenizer.model or a Llama 3 tiktoken file"
            ) from None
        n_pieces = self._sp.GetPieceSize()
        self._added = {t: i for t, i in (added_tokens or {}).items() if i >= n_pieces}
        self._added_text = {i: t for t, i in self._added.items()}
        self.vocab_size = max([n_pieces, *(i + 1 for i in self._added.values())])
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(
                f"sentencepiece model {path} has no BOS/EOS piece; retrain it with "
                "bos_id/eos_id set"
            )
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self._control = {i for i in range(n_pieces) if self._sp.IsControl(i)}
        try:
            types = piece_types(path)
        except (ValueError, IndexError):
            types = []
        # user-defined pieces (Gemma's turn markers) are matched in text by sentencepiece itself
        self._user_defined = {i for i, t in enumerate(types) if t == USER_DEFINED}
        # control pieces and added tokens spelled in a rendered template ("<s>", Mistral's
        # "[INST]", Phi-3's "<|user|>"), longest first
        texts = sorted([*((self._sp.IdToPiece(i), i) for i in self._control), *self._added.items()],
                       key=lambda t: -len(t[0]))
        self._control_ids = dict(texts)
        self._control_re = re.compile("|".join(re.escape(t) for t, _ in texts if t)) if texts else None
        pieces = self._sp.EncodeAsPieces("a")
        self._dummy_prefix = bool(pieces) and pieces[0].startswith("\u2581")
        self._legacy = legacy
        self._sp_no_prefix: spm.SentencePieceProcessor | None = None
        # BOS/EOS: the model's pieces unless tokenizer_config.json names other tokens it has
        self._names = {"bos_token": self._sp.IdToPiece(self.bos_id), "eos_token": self._sp.IdToPiece(self.eos_id)}
        for key, name in (("bos_token", bos_token), ("eos_token", eos_token)):
            if name in self._added or (name is not None and self._sp.PieceToId(name) != self._sp.unk_id()):
                self._names[key] = name
        self.bos_id = self.special_id(self._names["bos_token"])
        self.eos_id = self.special_id(self._names["eos_token"])
        self.stop_tokens = [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self._sp.Encode(text)
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is not in the vocabulary of {self.path}")
        if skip_special_tokens:  # sentencepiece drops control tokens itself
            return self._sp.Decode([i for i in ids if i not in self._added_text])
        # Render control and added tokens as their text between decoded runs of ordinary ids.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._control or i in self._added_text:
                if run:
                    out.append(self._sp.Decode(run))
                    run = []
                out.append(self._added_text.get(i) or self._sp.IdToPiece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.Decode(run))
        return "".join(out)

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        """Control-piece text is the control piece; each run of text between them is encoded by
        sentencepiece as transformers' converted tokenizer does it: with a dummy-prefix model
        (Llama 2, Mistral) a run gets the "▁" prefix only at the start of the text, or (with
        ``legacy: true`` in tokenizer_config.json) wherever it does not start with a space;
        Gemma's model adds none. The lengths count the text's own bytes (an added prefix 0)."""
        ids: list[int] = []
        lengths: list[int] = []
        pos = 0
        matches = list(self._control_re.finditer(text)) if self._control_re is not None else []
        for m in [*matches, None]:
            run = text[pos:m.start() if m else len(text)]
            if run:
                prefixed = self._dummy_prefix and not run.startswith(" ") and (pos == 0 or self._legacy)
                run_ids = (self._sp if prefixed else self._no_prefix()).Encode(run)
                run_lengths = [self._piece_bytes(i) for i in run_ids]
                if prefixed and run_lengths:  # the added "▁" is not in the text
                    run_lengths[0] = max(run_lengths[0] - 1, 0)
                ids += run_ids
                lengths += run_lengths
            if m is not None:
                ids.append(self._control_ids[m.group()])
                lengths.append(len(m.group().encode("utf-8")))
                pos = m.end()
        return ids, lengths

    def _no_prefix(self) -> spm.SentencePieceProcessor:
        """The same model with ``add_dummy_prefix`` off (built once): a serialized field-3
        NormalizerSpec appended to the ModelProto is merged into the model's own, and
        ``{3: false}`` in it is add_dummy_prefix."""
        if self._sp_no_prefix is None:
            if not self._dummy_prefix:
                self._sp_no_prefix = self._sp
            else:
                sp = spm.SentencePieceProcessor()
                sp.LoadFromSerializedProto(Path(self.path).read_bytes() + b"\x1a\x02\x18\x00")
                self._sp_no_prefix = sp
        return self._sp_no_prefix

    def _piece_bytes(self, i: int) -> int:
        if self._sp.IsByte(i):
            return 1
        return len(self._sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))

    def template_tokens(self) -> dict[str, str]:
        return dict(self._names)

    def special_texts(self) -> list[str]:
        return [*self._control_ids, *(self._sp.IdToPiece(i) for i in self._user_defined)]

    def special_token_ids(self) -> set[int]:
        return self._control | self._user_defined | set(self._added_text)

    @property
    def added_tokens(self) -> dict[str, int]:
        """The tokens past the model's pieces (text -> id)."""
        return dict(self._added)

    def special_id(self, name: str) -> int:
        if name in self._added:
            return self._added[name]
        i = self._sp.PieceToId(name)
        if i == self._sp.unk_id() and name != self._sp.IdToPiece(i):
            raise DataError(f"tokenizer {self.path} has no special token {name}")
        return i
