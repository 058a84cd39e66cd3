"""Llama 2 style sentencepiece ``tokenizer.model`` (a SentencePiece ModelProto)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from tunelab.data.tokenizers.base import BaseTokenizer
from tunelab.errors import DataError


class SentencePieceTokenizer(BaseTokenizer):
    """Thin wrapper over ``sentencepiece.SentencePieceProcessor``.

    Whole strings are passed to sentencepiece, so ids are exactly the library's (its dummy
    prefix "▁" is added once per ``encode`` call, as in Meta's Llama 2 code). Control-token
    text such as "<s>" in user input is encoded as plain text, which is sentencepiece's own
    behaviour for control symbols. Chat format: Llama 2 ``[INST]``.

    ``pad_id`` is the model's pad piece when it has one, else 0 (``<unk>`` in Llama 2, which
    has no pad piece): padded positions carry label -100, so the id only needs to be valid.

    Args:
        path: the ``tokenizer.model`` file.
        chat_template: informational Jinja template from tokenizer_config.json.

    Raises:
        DataError: the file is not a sentencepiece model or lacks BOS/EOS pieces.
    """

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
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
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(
                f"sentencepiece model {path} has no BOS/EOS piece; retrain it with "
                "bos_id/eos_id set"
            )
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.stop_tokens = [self.eos_id]
        self._control = {i for i in range(self.vocab_size) if self._sp.IsControl(i)}

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
        if skip_special_tokens:
            return self._sp.Decode(ids)  # sentencepiece drops control tokens itself
        # Render control tokens as their piece text between decoded runs of ordinary ids.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._control:
                if run:
                    out.append(self._sp.Decode(run))
                    run = []
                out.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.Decode(run))
        return "".join(out)

    def special_token_ids(self) -> set[int]:
        return set(self._control)

    def special_id(self, name: str) -> int:
        i = self._sp.PieceToId(name)
        if i == self._sp.unk_id() and name != self._sp.IdToPiece(i):
            raise DataError(f"tokenizer {self.path} has no special token {name}")
        return i
