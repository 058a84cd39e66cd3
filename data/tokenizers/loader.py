"""``load_tokenizer``: find the tokenizer file of a checkpoint and detect its format."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.data.tokenizers.base import BaseTokenizer
from tunelab.data.tokenizers.hf_json import load_hf_json, token_name
from tunelab.data.tokenizers.sentencepiece_tok import SentencePieceTokenizer
from tunelab.data.tokenizers.tiktoken_bpe import load_llama3_tiktoken
from tunelab.errors import DataError

_EXPECTED = (
    "a tokenizer.model (Llama 3 tiktoken or sentencepiece), optionally under original/, or a "
    "tokenizer.json"
)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object; fix or remove the file")
    return data


def _config_folders(file: Path, given: Path) -> list[Path]:
    """Where tokenizer_config.json may sit: the folder the user passed, next to the
    tokenizer, or one level up for ``original/tokenizer.model``."""
    folders = [given if given.is_dir() else file.parent, file.parent]
    if file.parent.name == "original":
        folders.append(file.parent.parent)
    return list(dict.fromkeys(folders))


def _find_config(folders: list[Path]) -> dict:
    for folder in folders:
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            return _read_json(cfg)
    return {}


def _find_template(config: dict, folders: list[Path]) -> str | None:
    """``chat_template`` from tokenizer_config.json, else a chat_template.jinja file (newer
    transformers save it separately)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # some repos store [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    for folder in folders:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
    return None


def _sniff(path: Path) -> str:
    """'tiktoken', 'sentencepiece' or 'json' from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        return "json"
    first = head.split(b"\n", 1)[0].strip()
    parts = first.split()
    if len(parts) == 2 and parts[1].isdigit():
        return "tiktoken"
    # A ModelProto starts with field 1 (pieces, length-delimited) = tag byte 0x0A.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    return "unknown"


def load_tokenizer(path_or_dir: str | Path) -> BaseTokenizer:
    """Load the tokenizer of a checkpoint folder or a tokenizer file.

    In a folder, looks for ``tokenizer.model`` (then ``original/tokenizer.model``), else
    ``tokenizer.json``. The file format is detected from its content: a Llama 3 tiktoken BPE
    file (``base64 rank`` lines), a sentencepiece model (protobuf) or an HF tokenizer.json
    with a byte-level BPE model. ``chat_template`` from tokenizer_config.json (or
    chat_template.jinja) is kept on the tokenizer, which renders it for chats where it can; the
    ``eos_token_id`` ids of generation_config.json are added to its stop tokens.

    Args:
        path_or_dir: checkpoint folder or tokenizer file.

    Raises:
        DataError: nothing usable found, or the file is not a supported format.
    """
    given = Path(path_or_dir).expanduser()
    if given.is_dir():
        candidates = [
            given / "tokenizer.model",
            given / "original" / "tokenizer.model",
            given / "tokenizer.json",
        ]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"no tokenizer in {given}; expected {_EXPECTED}")
        file = found
    elif given.is_file():
        file = given
    else:
        raise DataError(f"tokenizer path {given} does not exist; expected {_EXPECTED}")

    folders = _config_folders(file, given)
    config = _find_config(folders)
    template = _find_template(config, folders)

    kind = _sniff(file)
    if kind == "tiktoken":
        tok = load_llama3_tiktoken(file, chat_template=template)
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer(file, chat_template=template, legacy=config.get("legacy") is True,
                                     added_tokens=_added_tokens(folders), bos_token=token_name(config.get("bos_token")),
                                     eos_token=token_name(config.get("eos_token")))
    elif kind == "json":
        tok = load_hf_json(file, config=config, chat_template=template)
    else:
        raise DataError(f"{file} is not a recognised tokenizer; expected {_EXPECTED}")
    _add_generation_stops(tok, folders)
    return tok


def _added_tokens(folders: list[Path]) -> dict[str, int]:
    """Tokens a sentencepiece checkpoint adds past its model's pieces, text -> id: the
    ``added_tokens`` of its tokenizer.json, else added_tokens.json (Phi-3's chat markers)."""
    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            added = _read_json(folder / "tokenizer.json").get("added_tokens") or []
            return {t["content"]: t["id"] for t in added if isinstance(t, dict)
                    and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)}
        if (folder / "added_tokens.json").is_file():
            return {k: v for k, v in _read_json(folder / "added_tokens.json").items() if isinstance(v, int)}
    return {}


def _add_generation_stops(tok: BaseTokenizer, folders: list[Path]) -> None:
    """Add generation_config.json's ``eos_token_id`` (an id or a list: chat models name their
    end-of-turn token there, e.g. Qwen's <|im_end|> beside <|endoftext|>) to ``stop_tokens``.
    Only ids of this tokenizer's special tokens count: a generation_config written for another
    tokenizer must not stop generation at an ordinary token."""
    for folder in folders:
        path = folder / "generation_config.json"
        if path.is_file():
            eos = _read_json(path).get("eos_token_id")
            special = tok.special_token_ids()
            for i in eos if isinstance(eos, list) else [eos]:
                if i in special and i not in tok.stop_tokens:
                    tok.stop_tokens.append(i)
            return
