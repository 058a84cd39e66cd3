"""lora_grpo_single_device end to end on the built-in tiny model (CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import ConfigError
from tunelab.training.metrics import read_metrics


def _run(out, *extra):
    from tunelab.recipes import lora_grpo_single_device as recipe

    recipe.main(["--config", "tiny/grpo", f"output_dir={out}", "log_every_n_steps=1", *extra])
    return [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]


def test_tiny_grpo_reward_rises_and_logs_its_metrics(tmp_path, capsys):
    """tiny/grpo for 40 steps: the mean reward of the last 10 steps is clearly above the first
    10's (measured 0.34 -> 0.60), and every step logs the GRPO metrics."""
    rows = _run(tmp_path / "out", "max_steps=40", "save_merged=never")
    assert len(rows) == 40
    assert {"reward/mean", "reward/std", "reward/answer_letters", "reward/exact_answer", "completion_len/mean",
            "completion_len/max", "clip_ratio/region", "reward_failures", "rollout_tokens_per_s",
            "tokens_per_s", "loss", "grad_norm"} <= set(rows[0])
    first, last = (sum(r["reward/mean"] for r in part) / 10 for part in (rows[:10], rows[-10:]))
    assert last > first + 0.1
    assert "mean reward: " in capsys.readouterr().out


def test_resume_is_bit_identical(tmp_path):
    """4 steps straight, or 2 + resume: the sampling generator is seeded by (seed, step), so the
    same completions, rewards, losses and adapter, bit for bit; with beta > 0 (the KL to the
    adapters-off reference) and two updates per batch (the old log-probs kept)."""
    common = ("max_steps=4", "save_every_n_steps=2", "keep_last_n_checkpoints=3", "save_merged=never",
              "grpo.beta=0.04", "grpo.num_iterations=2")
    straight = _run(tmp_path / "a", *common)
    _run(tmp_path / "b", *common, "max_steps=2")
    resumed = _run(tmp_path / "b", *common, "resume=true")
    for key in ("reward/mean", "loss", "grad_norm", "kl", "clip_ratio/region"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    a = load_file(tmp_path / "a" / "step_4" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "step_4" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_raising_reward_is_contained(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text(
        "def picky(prompts, completions, answer, **_):\n"
        "    if any(a == 'autumn' for a in answer):\n"
        "        raise ValueError('no autumn')\n"
        "    return [0.5] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = _run(tmp_path / "out", "max_steps=3", "save_merged=never", "allowed_components=[my_rewards.*]",
                "rewards=[{_component_: my_rewards.picky}]")
    assert len(rows) == 3 and sum(r["reward_failures"] for r in rows) > 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("reward picky failed on row"))
    assert "ValueError: no autumn; scored 0" in line


@pytest.mark.parametrize("override,match", [
    (("grpo.num_generations=1",), "grpo.num_generations must be >= 2"),
    (("dataset._component_=tunelab.data.instruct_dataset", "dataset.source=builtin:tiny/train.jsonl"),
     "tunelab.data.prompt_dataset"),
    (("rewards=[]",), "rewards is empty"),
    (("grpo.loss_type=ppo",), "loss_type"),
])
def test_bad_settings_are_one_line(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        _run(tmp_path / "out", *override)


@pytest.mark.parametrize("config,kind", [("qwen3/8B_qlora_grpo", "qwen3"), ("llama3_1/8B_lora_grpo", "llama3_1")])
def test_shipped_grpo_configs_run_on_cpu(config, kind, tmp_path, make_hf_checkpoint, rt):
    """The 8B GRPO configs run unchanged on a tiny checkpoint and GSM8K-shaped rows (question,
    a worked answer ending in #### n), one step, short completions."""
    import json

    from tunelab.recipes import lora_grpo_single_device as recipe

    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"})
                            + "\n" for a in range(8)))
    out = tmp_path / "out"
    recipe.main(["--config", config, "device=cpu", f"checkpoint_dir={make_hf_checkpoint(kind)}",
                 f"tokenizer={rt.TINY_TOKENIZER}", f"dataset.source={data}", "~dataset.data_files", "max_steps=1",
                 "grpo.max_completion_len=4", f"output_dir={out}", "save_merged=never"])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 1 and "reward/exact_answer" in rows[0]
