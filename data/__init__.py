"""Data: tokenizers, chat messages, SFT dataset builders, packing and collation.

    from tunelab.data import load_tokenizer, instruct_dataset, PackedDataset, padded_collate
    tok = load_tokenizer(checkpoint_dir)
    ds = instruct_dataset(tok, source="alpaca.jsonl", max_seq_len=512)
    ds[0]  # {"tokens": [...], "labels": [...]}  (labels pre-shifted, -100 = not trained)
"""

from tunelab.data.tokenizers import Message, load_tokenizer
from tunelab.data.collate import packed_collate, padded_collate
from tunelab.data.datasets import (
    IGNORE_INDEX,
    TokenizedDataset,
    chat_dataset,
    instruct_dataset,
    shift_labels,
    text_completion_dataset,
)
from tunelab.data.packing import PackedDataset
from tunelab.data.kto import KTODataset, kto_collate, kto_dataset
from tunelab.data.preference import PreferenceDataset, preference_collate, preference_dataset
from tunelab.data.prompts import PromptDataset, prompt_dataset
from tunelab.data.sources import iter_rows, resolve_data_files

__all__ = [
    "IGNORE_INDEX",
    "KTODataset",
    "Message",
    "PackedDataset",
    "PreferenceDataset",
    "PromptDataset",
    "TokenizedDataset",
    "chat_dataset",
    "instruct_dataset",
    "iter_rows",
    "kto_collate",
    "kto_dataset",
    "load_tokenizer",
    "packed_collate",
    "padded_collate",
    "preference_collate",
    "preference_dataset",
    "prompt_dataset",
    "resolve_data_files",
    "shift_labels",
    "text_completion_dataset",
]
