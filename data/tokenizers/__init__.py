"""Tokenizers for Llama-family checkpoints, without HF ``tokenizers``/transformers.

* Llama 3 tiktoken ``tokenizer.model`` -> ``TiktokenTokenizer`` (Llama 3 chat format)
* sentencepiece ``tokenizer.model`` (Llama 2) -> ``SentencePieceTokenizer`` ([INST] format)
* HF ``tokenizer.json`` with a byte-level BPE model -> ``TiktokenTokenizer``

``load_tokenizer(path_or_dir)`` picks the right one; ``Message`` is the chat turn type taken
by ``tokenize_messages``.
"""

from tunelab.data.tokenizers.base import BaseTokenizer
from tunelab.data.tokenizers.hf_json import load_hf_json
from tunelab.data.tokenizers.loader import load_tokenizer
from tunelab.data.tokenizers.messages import Message
from tunelab.data.tokenizers.sentencepiece_tok import SentencePieceTokenizer
from tunelab.data.tokenizers.tiktoken_bpe import (
    LLAMA3_SPECIAL_TOKENS,
    LLAMA3_SPLIT_PATTERN,
    QWEN2_SPLIT_PATTERN,
    TiktokenTokenizer,
    load_llama3_tiktoken,
)

Tokenizer = BaseTokenizer

__all__ = [
    "BaseTokenizer",
    "LLAMA3_SPECIAL_TOKENS",
    "LLAMA3_SPLIT_PATTERN",
    "Message",
    "QWEN2_SPLIT_PATTERN",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "load_hf_json",
    "load_llama3_tiktoken",
    "load_tokenizer",
]
