"""GRPO rollouts (training/grpo.py) on a tiny model: the group layout, labels on the sampled
tokens only, rewards and advantages, and the per-token log-probs the loss takes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.data import Message, load_tokenizer, prompt_dataset
from tunelab.modules.loss import IGNORE_INDEX, token_log_probs_from_hidden
from tunelab.training.grpo import roll_out
from tunelab.training.rewards import Reward, RewardSet

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tiny" / "tokenizer.model"


def test_prompt_dataset_keeps_the_other_columns(tmp_path):
    rows = [{"prompt": "What is 2 + 3?", "answer": 5}, {"prompt": [{"role": "user", "content": "Say hi."}],
                                                         "answer": "hi"},
            {"question": "no prompt column"}, {"prompt": ""}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(TINY_TOKENIZER)
    ds = prompt_dataset(tok, source=path, max_seq_len=64)
    assert len(ds) == 2 and ds.num_skipped == 2
    assert ds[0]["fields"] == {"answer": 5} and ds[0]["prompt"] == "What is 2 + 3?"
    want, _ = tok.tokenize_messages([Message(role="user", content="What is 2 + 3?")], add_generation_prompt=True)
    assert ds[0]["prompt_ids"] == want


def test_rollout_layout_rewards_and_log_probs(tmp_path, make_hf_checkpoint):
    from tunelab.models import from_pretrained

    tok = load_tokenizer(TINY_TOKENIZER)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Count to {n}.", "n": n}) + "\n" for n in (2, 3)))
    items = [prompt_dataset(tok, source=path, max_seq_len=64)[i] for i in range(2)]
    model = from_pretrained(make_hf_checkpoint("llama3"))
    seen = {}

    def longer_is_better(prompts, completions, n, **_):  # a graded reward that uses a row field
        seen.setdefault("n", []).extend(n)
        return [float(len(c)) for c in completions]

    rewards = RewardSet([Reward("length", longer_is_better, 0.5)])
    r = roll_out(model, items, tok, rewards, num_generations=3, max_completion_len=6, temperature=1.0, top_k=None,
                 top_p=None, scale_rewards="group", generator=torch.Generator().manual_seed(0))
    assert r.tokens.shape[0] == 6 and seen["n"] == [2, 2, 2, 3, 3, 3]
    torch.testing.assert_close(r.rewards, 0.5 * torch.tensor([float(len(c)) for c in r.completions]))
    assert r.advantages.view(2, 3).sum(1).abs().max() < 1e-5  # zero mean within each group
    for i in range(6):
        p = len(items[i // 3]["prompt_ids"])
        n = int(r.completion_lengths[i])
        assert r.mask[i].sum() == n and r.labels[i, p - 1 : p - 1 + n].tolist() == r.tokens[i, p : p + n].tolist()
        assert r.sequence_lengths[i] == p + n
    with torch.no_grad():
        hidden = model(r.tokens, return_hidden=True)
        per_token = token_log_probs_from_hidden(hidden, r.labels, model.logits_from_hidden)
        full = torch.log_softmax(model(r.tokens).float(), -1)
    want = full.gather(-1, r.labels.clamp(min=0)[..., None])[..., 0] * r.mask
    torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-5)
    assert (per_token[r.labels == IGNORE_INDEX] == 0).all()
