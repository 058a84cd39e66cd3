"""Generated bad inputs beyond configs: dataset rows of every builder and config.json values.
Each bad row is skipped and counted (never an exception, the good rows all used); each bad
config.json value is a one-line CheckpointError naming its key, or a valid config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunelab.data import chat_dataset, instruct_dataset, load_tokenizer, preference_dataset, text_completion_dataset
from tunelab.errors import CheckpointError
from tunelab.models import args_from_hf_config

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"
JUNK = [None, 0, -1, 1.5, True, "", [], {}, [1, "a"], {"a": {"b": [None]}}, "x" * 3000, "\x00\ud800?"]


def _junk_rows(good: dict, rng: random.Random, n: int) -> list:
    """Rows built from a good one: a field replaced by junk, dropped, or the row itself junk."""
    rows = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            rows.append(rng.choice(JUNK))  # not an object at all
        elif kind == 1:
            row = dict(good)
            row.pop(rng.choice(list(row)))
            rows.append(row)
        else:
            row = dict(good)
            row[rng.choice(list(row))] = rng.choice([j for j in JUNK if not isinstance(j, str)])
            rows.append(row)
    return rows


BUILDERS = {
    "instruct": (instruct_dataset, {"instruction": "Say hi", "input": "", "output": "hi there"}),
    "chat": (chat_dataset, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    "text": (text_completion_dataset, {"text": "some words to learn"}),
    "preference": (preference_dataset, {"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_generated_bad_rows_are_skipped_and_counted(name, tmp_path):
    builder, good = BUILDERS[name]
    tok = load_tokenizer(TINY / "tokenizer.model")
    rng = random.Random(sum(map(ord, name)))
    bad = _junk_rows(good, rng, 60)
    lines = [json.dumps(good)] * 5 + [json.dumps(row) for row in bad] + ["{cut", "\ufeff[", "[" * 5000]
    rng.shuffle(lines)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    dataset = builder(tok, source=path, max_seq_len=64)
    assert len(dataset) >= 5  # every good row is used (a junk value may still make a usable row)
    assert len(dataset) + dataset.num_skipped == len(lines)


KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
        "tie_word_embeddings", "rope_scaling", "architectures", "model_type", "sliding_window", "layer_types"]
GOOD = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.mark.parametrize("key", KEYS)
def test_generated_bad_config_json_values_are_one_line(key):
    for value in JUNK + [-5, 3.5, 10**30, float("nan"), float("inf"), ["x"], "llama"]:
        config = dict(GOOD, **{key: value})
        try:
            args = args_from_hf_config(json.loads(json.dumps(config)))
        except CheckpointError as e:
            assert "\n" not in str(e) and (key in str(e) or "inconsistent" in str(e)), (key, value, str(e))
        else:  # accepted: then it is a buildable architecture
            assert args.dim >= 1 and args.n_heads >= 1 and args.head_dim % 2 == 0, (key, value)
