"""HF ``tokenizer.json`` with a byte-level BPE model (what most Llama 3 fine-tunes ship),
read without the ``tokenizers`` library and run on tiktoken.

How it maps onto tiktoken:

* Vocabulary strings use GPT-2's byte-to-unicode alphabet; they are turned back into raw
  bytes (a character outside that alphabet means the model is not byte-level -> DataError).
* tiktoken merges the adjacent pair whose concatenation has the lowest *rank*, so ranks must
  follow the order of ``merges``. When the ids already do (Llama 3 files: ids increase along
  the merges), ids are used as ranks; otherwise ranks are derived from the merge order and
  mapped back to ids on the way out. Vocabulary entries that no merge produces get ranks after
  every merge (reachable as whole pre-tokenized words, as with ``ignore_merges``).
* The pre-tokenizer regex is the ``Split`` pattern of ``pre_tokenizer`` (Llama 3 files) or
  GPT-2's pattern for ``ByteLevel(use_regex=true)``; with no pre-tokenizer regex the Llama 3
  pattern is used.
* ``added_tokens`` are kept out of the BPE ranks. Special ones (``special: true``) are never
  produced from input text (so "<|eot_id|>" typed by a user stays text); non-special added
  tokens are matched in the text, as ``tokenizers`` does (lstrip/rstrip/single_word options
  are not honoured).

Known limits: a BPE whose merges reach the same token along two paths, or a Split regex that
leaves characters unmatched, can tokenize differently from ``tokenizers``; other normalizers
than NFC/NFD/NFKC/NFKD and other pre-tokenizers raise DataError.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from tunelab.data.tokenizers.tiktoken_bpe import LLAMA3_SPLIT_PATTERN, TiktokenTokenizer
from tunelab.errors import DataError

GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, etc.) map
    to code points 256, 257, ... in byte order, so no vocabulary string contains whitespace.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(token: str, path: Path) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        raise DataError(
            f"{path} is not a byte-level BPE (token {token!r} uses characters outside the "
            "byte-level alphabet); use the checkpoint's sentencepiece tokenizer.model instead"
        ) from None


def _walk(node: dict | None, key: str = "pretokenizers") -> list[dict]:
    """Flatten a (possibly Sequence) normalizer / pre-tokenizer node into its parts."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get(key, []) for p in _walk(child, key)]
    return [node]


def _normalizer(spec: dict | None, path: Path):
    forms = []
    for part in _walk(spec, "normalizers"):
        kind = part.get("type")
        if kind not in ("NFC", "NFD", "NFKC", "NFKD"):
            raise DataError(
                f"{path} uses the unsupported normalizer {kind}; only NFC/NFD/NFKC/NFKD are "
                "supported"
            )
        forms.append(kind)
    if not forms:
        return None

    def normalize(text: str) -> str:
        for form in forms:
            text = unicodedata.normalize(form, text)
        return text

    return normalize


def _pre_tokenizer(spec: dict | None, path: Path) -> tuple[str, bool, bool]:
    """(split regex, add_prefix_space, saw_byte_level) from the pre_tokenizer node."""
    pattern: str | None = None
    prefix = False
    byte_level = False
    for part in _walk(spec):
        kind = part.get("type")
        if kind == "ByteLevel":
            byte_level = True
            prefix = bool(part.get("add_prefix_space", False))
            if part.get("use_regex", True):
                if pattern is not None:
                    raise DataError(
                        f"{path}: a Split and a regex ByteLevel pre-tokenizer together are not "
                        "supported"
                    )
                pattern = GPT2_SPLIT_PATTERN
        elif kind == "Split":
            pat = part.get("pattern", {})
            regex = pat.get("Regex")
            if regex is None and "String" in pat:
                regex = re.escape(pat["String"])
            isolated = str(part.get("behavior", "")).lower() == "isolated"
            if regex is None or part.get("invert") or not isolated:
                raise DataError(
                    f"{path}: only an Isolated, non-inverted Split pre-tokenizer is supported"
                )
            if pattern is not None:
                raise DataError(f"{path}: more than one split pattern in pre_tokenizer")
            pattern = regex
        else:
            raise DataError(
                f"{path} uses the unsupported pre-tokenizer {kind}; expected Split/ByteLevel"
            )
    return pattern or LLAMA3_SPLIT_PATTERN, prefix, byte_level


def token_name(value) -> str | None:
    """tokenizer_config.json stores tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_bos(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts first, if any."""
    for part in _walk(post, "processors"):
        if part.get("type") == "TemplateProcessing":
            single = part.get("single") or []
            if single and "SpecialToken" in single[0]:
                return single[0]["SpecialToken"].get("id")
    return None


def _ranks(vocab: dict[str, int], merges: list, added_ids: set[int], path: Path):
    """(mergeable_ranks, rank_to_id or None) following merge order (see module docstring)."""
    id_bytes: dict[int, bytes] = {}
    for token, idx in vocab.items():
        if idx not in added_ids:
            id_bytes[idx] = _token_bytes(token, path)
    bytes_id = {b: i for i, b in id_bytes.items()}
    missing = [b for b in range(256) if bytes([b]) not in bytes_id]
    if missing:
        raise DataError(
            f"{path} lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); cannot "
            "run it as byte-level BPE"
        )

    merged: list[int] = []  # ids produced by merges, in merge order (first producer wins)
    seen: set[int] = set()
    for n, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        idx = vocab.get(left + right)
        if idx is None or left not in vocab or right not in vocab:
            raise DataError(
                f"{path}: merge {n} ({left!r}, {right!r}) uses or makes a token missing from "
                "the vocab"
            )
        if idx not in seen and idx not in added_ids:
            seen.add(idx)
            merged.append(idx)
    singles = [bytes_id[bytes([b])] for b in range(256)]
    others = sorted(i for i, b in id_bytes.items() if len(b) > 1 and i not in seen)

    ids_follow_merges = all(a < b for a, b in zip(merged, merged[1:])) and (
        not merged or not others or min(others) > merged[-1]
    )
    if ids_follow_merges:
        return {b: i for i, b in id_bytes.items()}, None
    order = singles + merged + others + sorted(set(id_bytes) - set(singles) - seen - set(others))
    ranks = {id_bytes[i]: r for r, i in enumerate(order)}
    return ranks, {r: i for r, i in enumerate(order)}


def load_hf_json(
    path: str | Path, config: dict | None = None, chat_template: str | None = None
) -> TiktokenTokenizer:
    """Load a byte-level BPE ``tokenizer.json``.

    BOS/EOS/pad come from tokenizer_config.json (``bos_token``/``eos_token``/``pad_token``)
    when given, else from the post-processor template / well-known token names. Stop tokens:
    EOS plus <|end_of_text|>, <|eot_id|>, <|eom_id|> when present. The chat format is Llama 3's
    when its header tokens exist.

    Args:
        path: the tokenizer.json file.
        config: parsed tokenizer_config.json ({} if absent).
        chat_template: informational template to keep on the tokenizer.

    Raises:
        DataError: unreadable file or a model other than byte-level BPE.
    """
    path = Path(path)
    config = config or {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"cannot read {path} as JSON ({e}); expected an HF tokenizer.json"
        ) from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise DataError(f"{path} has no 'model' section; expected an HF tokenizer.json")
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise DataError(
            f"{path} uses a {kind} model; only byte-level BPE tokenizer.json is supported "
            "(use the checkpoint's sentencepiece tokenizer.model instead)"
        )
    kinds = {p.get("type") for p in _walk(data.get("pre_tokenizer"))}
    kinds |= {p.get("type") for p in _walk(data.get("decoder"), "decoders")}
    if "ByteLevel" not in kinds:
        raise DataError(
            f"{path} is a BPE tokenizer.json without ByteLevel pre-tokenizer/decoder (a "
            "sentencepiece-style BPE); use the checkpoint's tokenizer.model instead"
        )
    pattern, prefix, _ = _pre_tokenizer(data.get("pre_tokenizer"), path)
    normalize = _normalizer(data.get("normalizer"), path)

    added = [t for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    added_ids = {int(t["id"]) for t in added}
    ranks, rank_to_id = _ranks(model.get("vocab") or {}, model.get("merges") or [], added_ids, path)
    specials = {t["content"]: int(t["id"]) for t in added}
    text_tokens = [t["content"] for t in added if not t.get("special", False)]

    bos = token_name(config.get("bos_token")) if "bos_token" in config else None
    if bos is None and "bos_token" not in config:
        bos = _template_bos(data.get("post_processor"))
        bos = bos or next((n for n in _BOS_NAMES if n in specials), None)
    eos = token_name(config.get("eos_token"))
    eos = eos or next((n for n in _EOS_NAMES if n in specials), None)
    pad = token_name(config.get("pad_token"))
    if pad is None and "<|finetune_right_pad_id|>" in specials:
        pad = "<|finetune_right_pad_id|>"
    chat_format = "llama3" if all(t in specials for t in LLAMA3_HEADER_TOKENS) else None
    return TiktokenTokenizer(
        mergeable_ranks=ranks,
        pattern=pattern,
        special_tokens=specials,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        stop_token_names=["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
        text_tokens=text_tokens,
        rank_to_id=rank_to_id,
        chat_format=chat_format,
        path=str(path),
        chat_template=chat_template,
        prefix_space=prefix,
        normalize=normalize,
    )
