"""builtin:tiny checkpoint (created once, atomically) and builtin:tiny/<file> data paths."""

import json

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.training.builtin import TINY_NAME, resolve_builtin, tiny_data_dir


def test_tiny_checkpoint_created_once(tmp_path, monkeypatch, load_hf_model):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    (tmp_path / f".{TINY_NAME}.tmp99999").mkdir(parents=True)  # debris of a killed creator
    path = resolve_builtin("builtin:tiny")
    assert path == str(tmp_path / TINY_NAME)
    cfg = json.loads((tmp_path / TINY_NAME / "config.json").read_text())
    assert cfg["vocab_size"] == 762 and cfg["num_hidden_layers"] == 4
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert (tmp_path / TINY_NAME / "tokenizer.model").is_file()
    weights = sorted((tmp_path / TINY_NAME).glob("*.safetensors"))
    mtime = weights[0].stat().st_mtime_ns
    assert resolve_builtin("builtin:tiny") == path and weights[0].stat().st_mtime_ns == mtime  # reused

    # same weights everywhere (fixed seed), and transformers reads it like tunelab does
    from tunelab.models import from_pretrained

    ours = from_pretrained(path)
    tokens = torch.randint(0, 762, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(path)(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)


def test_builtin_data_files():
    assert resolve_builtin("builtin:tiny/train.jsonl") == str(tiny_data_dir() / "train.jsonl")
    assert resolve_builtin("/plain/path.jsonl") == "/plain/path.jsonl"
    with pytest.raises(ConfigError, match="train.jsonl"):
        resolve_builtin("builtin:tiny/nope.jsonl")
    with pytest.raises(ConfigError, match="unknown builtin"):
        resolve_builtin("builtin:huge")
