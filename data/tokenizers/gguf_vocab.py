"""Tokenizer -> GGUF vocabulary (``tokenizer.ggml.*`` keys), as llama.cpp reads it.

The tokenizer half of a GGUF export (``tunelab.training.export.export_gguf`` hands it to the
weights writer, ``tunelab.models.gguf``): it lives with the tokenizers it reads.

Three sources, found the way ``tunelab.data.load_tokenizer`` finds them (so the GGUF file
tokenizes exactly like the tokenizer tunelab trained with):

* sentencepiece ``tokenizer.model`` (Llama 2) -> ``tokenizer.ggml.model = "llama"``: every
  piece with its score and type, read straight from the model's protobuf (llama.cpp's SPM
  tokenizer merges by score and falls back to the ``<0xNN>`` byte pieces).
* Llama 3 tiktoken ``tokenizer.model`` -> ``"gpt2"`` (byte-level BPE): tokens spelled in
  GPT-2's byte-to-unicode alphabet, the 256 special tokens as CONTROL, and merges derived
  from the ranks (below), pre-tokenizer ``"llama-bpe"`` (Llama 3's split regex).
* HF ``tokenizer.json`` with a byte-level BPE model and Llama 3's split regex (pre-tokenizer
  ``"llama-bpe"``) or Qwen's (``"qwen2"``) -> the same, with the vocabulary and merges taken as
  the file spells them.

Merges from tiktoken ranks: tiktoken merges the adjacent pair whose concatenation has the
lowest rank. llama.cpp merges the pair that comes first in the merges list. So each
multi-byte token gets one merge, ``left right``, where left/right are the two parts BPE
reaches when it may only use tokens of lower rank; listing these merges by the rank of the
token they make gives llama.cpp the same priorities. (A token reachable along two different
splits keeps one of them, as every tiktoken -> HF conversion does.)

Model rows past the tokenizer's last id (vocabularies padded to a multiple of 64, say) get
``[PAD{i}]`` tokens of type UNUSED, which no text ever produces.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.tokenizers import (
    LLAMA3_SPLIT_PATTERN,
    QWEN2_SPLIT_PATTERN,
    BaseTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
)
from tunelab.data.tokenizers.hf_json import bytes_to_unicode

# gguf.TokenType values are sentencepiece's piece types (the same numbering)
from tunelab.data.tokenizers.sentencepiece_tok import CONTROL, NORMAL, UNUSED, USER_DEFINED, proto_fields
from tunelab.data.tokenizers.tiktoken_bpe import read_tiktoken_file
from tunelab.errors import CheckpointError, DataError

__all__ = ["GGUFVocab", "build_vocab", "LLAMA3_CHAT_TEMPLATE", "LLAMA2_CHAT_TEMPLATE"]

# Jinja chat templates written into the GGUF when the checkpoint brings none (a tokenizer
# without tokenizer_config.json). They render the same text as tunelab's chat formats
# (tunelab.data.tokenizers.messages), so llama.cpp's chat mode prompts a fine-tuned model the
# way it was trained.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' }}"
    "{%- if loop.first and system %}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif %}"
    "{{- message['content'] | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)
_TEMPLATES = {"llama3": LLAMA3_CHAT_TEMPLATE, "llama2": LLAMA2_CHAT_TEMPLATE}


@dataclass
class GGUFVocab:
    """Everything the GGUF file (and the Ollama Modelfile) needs to know about the tokenizer.

    Attributes:
        model: ``"llama"`` (sentencepiece) or ``"gpt2"`` (byte-level BPE).
        pre: llama.cpp pre-tokenizer name (``"llama-bpe"``) for BPE, None for sentencepiece.
        tokens: token text per id (byte-level alphabet for BPE; pieces for sentencepiece).
        types: gguf token type per id.
        scores: sentencepiece scores (None for BPE).
        merges: ``"left right"`` merges in priority order (None for sentencepiece).
        special_ids: ``{"bos": id, "eos": ..., "eot": ..., "eom": ..., "pad": ..., "unk": ...}``
            (only the ones the tokenizer has).
        add_bos: llama.cpp prepends BOS when tokenizing a prompt.
        add_space_prefix / remove_extra_whitespaces: sentencepiece normalizer settings.
        chat_template: Jinja template (the checkpoint's, else tunelab's for the chat format).
        chat_format: ``"llama3"``, ``"llama2"`` or None (tunelab's native chat format).
        stop_texts: text of the tokens that end a reply (Modelfile ``PARAMETER stop``).
    """

    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = True
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | None = None
    chat_format: str | None = None
    stop_texts: list[str] = field(default_factory=list)

    def write(self, writer) -> None:
        """Add the ``tokenizer.ggml.*`` keys and the chat template to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "eot": writer.add_eot_token_id,
            "eom": writer.add_eom_token_id,
            "pad": writer.add_pad_token_id,
            "unk": writer.add_unk_token_id,
        }
        for key, token_id in self.special_ids.items():
            adders[key](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def build_vocab(tokenizer_path, vocab_size: int) -> GGUFVocab:
    """Read a checkpoint's tokenizer and lay it out as a GGUF vocabulary.

    Args:
        tokenizer_path: checkpoint folder or tokenizer file (as for ``load_tokenizer``).
        vocab_size: rows of the model's embedding; the token list is padded to it.

    Raises:
        CheckpointError: no tokenizer, an unsupported kind (a byte-level BPE whose split regex
            is neither Llama 3's nor Qwen's), or more tokens than the model has rows.
    """
    try:
        tok = load_tokenizer(tokenizer_path)
    except DataError as e:
        raise CheckpointError(f"{e} (pass the tokenizer with --tokenizer)") from None
    path = Path(tok.path)
    if isinstance(tok, SentencePieceTokenizer):
        vocab = _sentencepiece_vocab(path)
    elif isinstance(tok, TiktokenTokenizer) and path.suffix == ".json":
        vocab = _hf_json_vocab(path, tok)
    elif isinstance(tok, TiktokenTokenizer):
        vocab = _tiktoken_vocab(path, tok)
    else:  # pragma: no cover - load_tokenizer returns one of the above
        raise CheckpointError(f"{path}: tokenizer type {type(tok).__name__} cannot be exported")

    n = len(vocab.tokens)
    if max(n, tok.vocab_size) > vocab_size:
        raise CheckpointError(
            f"{path} has {max(n, tok.vocab_size)} tokens but the model's embedding has {vocab_size} rows; "
            "export with the tokenizer the model was trained with"
        )
    vocab.tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    vocab.types += [UNUSED] * (vocab_size - n)
    if vocab.scores is not None:
        vocab.scores += [-1000.0] * (vocab_size - n)
    if isinstance(tok, SentencePieceTokenizer):  # tokens past the model's pieces (Phi-3's chat markers)
        for text, token_id in tok.added_tokens.items():
            vocab.tokens[token_id], vocab.types[token_id] = text, CONTROL
            vocab.scores[token_id] = 0.0

    vocab.special_ids.update(_special_ids(tok))
    vocab.add_bos = tok.bos_id is not None  # Qwen's tokenizers have none: llama.cpp must not add one
    vocab.chat_format = tok.chat_format
    vocab.chat_template = tok.chat_template or _TEMPLATES.get(tok.chat_format or "")
    vocab.stop_texts = [vocab.tokens[i] for i in tok.stop_tokens]
    return vocab


def _special_ids(tok: BaseTokenizer) -> dict[str, int]:
    ids: dict[str, int] = {}
    if tok.bos_id is not None:
        ids["bos"] = tok.bos_id
    if tok.eos_id is not None:
        ids["eos"] = tok.eos_id
    ids["pad"] = tok.pad_id
    # llama.cpp ends generation at any of eos/eot/eom; naming them keeps that from depending
    # on its guess by token text.
    for key, name in (("eot", "<|eot_id|>"), ("eom", "<|eom_id|>")):
        try:
            ids[key] = tok.special_id(name)
        except DataError:
            pass  # the tokenizer has no such token (sentencepiece models)
    if isinstance(tok, SentencePieceTokenizer) and tok._sp.unk_id() >= 0:
        ids["unk"] = tok._sp.unk_id()
    return ids


# ---------------------------------------------------------------------------- sentencepiece
def _sentencepiece_vocab(path: Path) -> GGUFVocab:
    """Pieces, scores and types straight from the ModelProto (sentencepiece's Python API does
    not expose user-defined pieces or the normalizer flags, and protobuf is not a dependency)."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    add_dummy_prefix = True  # proto2 defaults of NormalizerSpec
    remove_extra_whitespaces = True
    try:
        for number, _, value in proto_fields(path.read_bytes()):
            if number == 1:  # ModelProto.pieces
                piece, score, kind = "", 0.0, NORMAL
                for n, _, v in proto_fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                tokens.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 3:  # ModelProto.normalizer_spec
                for n, _, v in proto_fields(value):
                    if n == 3:
                        add_dummy_prefix = bool(v)
                    elif n == 4:
                        remove_extra_whitespaces = bool(v)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable sentencepiece model ({e})") from None
    return GGUFVocab(
        model="llama",
        tokens=tokens,
        types=types,
        scores=scores,
        add_space_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_whitespaces,
    )


# ---------------------------------------------------------------------------- byte-level BPE
def _merge_parts(ranks: dict[bytes, int], token: bytes, rank: int) -> list[bytes]:
    """BPE of ``token``'s bytes using only tokens ranked below ``rank`` (lowest rank first)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges (left, right) that reproduce tiktoken's ranks, in priority order.

    Args:
        ranks: token bytes -> rank, as in a tiktoken file.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _merge_parts(ranks, token, rank)
        if len(parts) == 2:  # otherwise BPE can never produce this token: it needs no merge
            merges.append((parts[0], parts[1]))
    return merges


def _tiktoken_vocab(path: Path, tok: TiktokenTokenizer) -> GGUFVocab:
    ranks = read_tiktoken_file(path)
    to_unicode = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    n = max([*ranks.values(), *tok.special_tokens.values()]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for token, rank in ranks.items():
        tokens[rank] = spell(token)
        types[rank] = NORMAL
    for text, token_id in tok.special_tokens.items():
        tokens[token_id] = text
        types[token_id] = CONTROL
    merges = [f"{spell(a)} {spell(b)}" for a, b in tiktoken_merges(ranks)]
    return GGUFVocab(model="gpt2", pre="llama-bpe", tokens=tokens, types=types, merges=merges)


# split regex -> llama.cpp's name for the pre-tokenizer that splits the same way
_LLAMA_CPP_PRE = {LLAMA3_SPLIT_PATTERN: "llama-bpe", QWEN2_SPLIT_PATTERN: "qwen2"}


def _split_patterns(node) -> list[str]:
    """Every Split regex in a tokenizer.json pre_tokenizer node (nested Sequences included)."""
    if isinstance(node, dict):
        found = []
        if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
            regex = node["pattern"].get("Regex")
            if regex is not None:
                found.append(regex)
        for value in node.values():
            found += _split_patterns(value)
        return found
    if isinstance(node, list):
        return [p for item in node for p in _split_patterns(item)]
    return []


def _hf_json_vocab(path: Path, tok: TiktokenTokenizer) -> GGUFVocab:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        raw_merges = model.get("merges") or []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable tokenizer.json ({e})") from None
    patterns = _split_patterns(data.get("pre_tokenizer"))
    pre = _LLAMA_CPP_PRE.get(patterns[0]) if len(patterns) == 1 else None
    if pre is None:
        raise CheckpointError(
            f"{path}: GGUF export supports byte-level BPE tokenizers with Llama 3's or Qwen's split regex; "
            "this one splits differently (export from the original tokenizer.model instead)"
        )
    n = max([*vocab.values(), *tok.special_tokens.values()]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = NORMAL
    text_tokens = getattr(tok, "_text_tokens", set())
    for added in data.get("added_tokens") or []:
        token_id, text = added["id"], added["content"]
        tokens[token_id] = text
        types[token_id] = USER_DEFINED if text in text_tokens else CONTROL
    # merges are stored as "a b" strings (older files) or [a, b] pairs (newer ones)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)
