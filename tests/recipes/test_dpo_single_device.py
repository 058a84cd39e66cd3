"""lora_dpo_single_device end to end on transformers-written checkpoints (CPU, fp32)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import ConfigError
from tunelab.recipes import lora_dpo_single_device as recipe
from tunelab.training import dpo
from tunelab.training.checkpointing import COMPLETE
from tunelab.training.metrics import read_metrics

TINY = Path(recipe.__file__).resolve().parents[1] / "data" / "tiny"
TINY_TOKENIZER = TINY / "tokenizer.model"
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,output"


def pairs_file(tmp_path: Path, n: int, start: int = 0) -> Path:
    """The first n packaged tiny preference pairs (both record shapes occur)."""
    lines = (TINY / "preferences.jsonl").read_text().splitlines()[start : start + n]
    path = tmp_path / f"pairs_{start}_{n}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dpo_argv(ckpt, out, data, *extra: str) -> list[str]:
    """tiny/dpo retargeted at a test checkpoint; small and quick."""
    return ["--config", "tiny/dpo", f"checkpoint_dir={ckpt}", f"tokenizer={TINY_TOKENIZER}", f"output_dir={out}",
            f"dataset.source={data}", "validation=null", "max_seq_len=64", "batch_size=4", "log_every_n_steps=1",
            "eval_every_n_steps=null", "lr_scheduler.warmup_steps=1", "save_merged=never", *extra]


def run(argv: list[str]) -> list[dict]:
    recipe.main(argv)
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
    return read_metrics(out / "metrics.jsonl")


def test_reward_accuracy_rises_and_adapter_loads_in_peft(tmp_path, make_hf_checkpoint, load_hf_model):
    """16 pairs, 6 epochs: on the pairs it trains on, the policy learns to prefer the right
    answers (validation = the same file). The PEFT adapter reproduces tunelab's logits in
    transformers (fp32, same math: 1e-4)."""
    from peft import PeftModel

    from tunelab.models import from_pretrained
    from tunelab.models.adapters import load_adapter

    ckpt = make_hf_checkpoint("llama3")
    data = pairs_file(tmp_path, 16)
    out = tmp_path / "out"
    rows = run(dpo_argv(ckpt, out, data, "epochs=6", "optimizer.lr=1.0e-2", "loss.beta=0.5",
                        f"lora.targets=[{ALL_TARGETS}]", "save_merged=final",
                        f"validation={{_component_: tunelab.data.preference_dataset, source: {data}}}",
                        "eval_every_n_steps=8"))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 25))
    assert set(train[0]) >= {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm", *dpo.REWARD_KEYS}
    # step 1: adapters start at B = 0, so policy == reference: loss log 2, rewards 0
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["rewards/accuracy"] == 0.0 and train[0]["rewards/margins"] == 0.0
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9, evals
    assert evals[-1]["eval_loss"] < 0.5 < math.log(2)
    assert evals[-1]["eval_rewards/margins"] > max(evals[0]["eval_rewards/margins"], 0)

    step_dir = out / "step_24"
    assert sorted(p.name for p in step_dir.iterdir()) == ["COMPLETE", "adapter", "merged", "state"]
    cfg = json.loads((step_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    tokens = torch.randint(0, 700, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_adapter(from_pretrained(ckpt), step_dir / "adapter").eval()(tokens)
        peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), step_dir / "adapter").eval()
        torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_hf_model(step_dir / "merged")(tokens).logits, expected, atol=1e-4, rtol=1e-4)


def test_resume_gives_identical_losses_and_adapter(tmp_path, make_hf_checkpoint):
    """6 steps straight vs 3 + resume to 6 (crossing an epoch, LoRA dropout on so the RNG state
    matters): bit-identical on CPU fp32."""
    ckpt = make_hf_checkpoint("llama2")
    data = pairs_file(tmp_path, 16)
    extra = ("max_steps=6", "epochs=3", "save_every_n_steps=3", "lora.dropout=0.1")
    straight = run(dpo_argv(ckpt, tmp_path / "a", data, *extra))
    out = tmp_path / "b"
    run(dpo_argv(ckpt, out, data, *extra))
    shutil.rmtree(out / "step_6")  # as if killed after the step-3 checkpoint
    resumed = run(dpo_argv(ckpt, out, data, *extra, "resume=true"))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "grad_norm", *dpo.REWARD_KEYS):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    a = load_file(tmp_path / "a" / "step_6" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "step_6" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_matches_in_step_reference(tmp_path, make_hf_checkpoint):
    """Same losses and rewards for 3 steps: the precomputed log-probs come from batches padded
    differently (dataset order), so allow fp32 rounding (1e-5). At step 1 policy == reference,
    so the accuracy (strict chosen > rejected) of rounding-level margins is not compared."""
    ckpt = make_hf_checkpoint("llama3_1")
    data = pairs_file(tmp_path, 12, start=100)
    common = ("max_steps=3", "optimizer.lr=1.0e-2", "loss.beta=0.5")
    in_step = run(dpo_argv(ckpt, tmp_path / "a", data, *common))
    pre = run(dpo_argv(ckpt, tmp_path / "b", data, *common, "precompute_ref_log_probs=true"))
    for r1, r2 in zip(in_step, pre, strict=True):
        for key in ("loss", *dpo.REWARD_KEYS):
            if key == "rewards/accuracy" and r1["step"] == 1:
                continue
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_reference_is_the_base_model_exactly(tmp_path, make_hf_checkpoint, quantize):
    """With trained-looking (non-zero) adapters, the reference log-probs equal the plain base
    model's (dense, or the same NF4 base for QLoRA) bit for bit, and the policy's differ."""
    from tunelab.data import load_tokenizer, preference_collate, preference_dataset
    from tunelab.models import from_pretrained
    from tunelab.modules.peft import apply_lora

    ckpt = make_hf_checkpoint("llama3")
    tok = load_tokenizer(TINY_TOKENIZER)
    ds = preference_dataset(tok, source=pairs_file(tmp_path, 4), max_seq_len=64)
    batch = preference_collate([ds[i] for i in range(4)], tok.pad_id)
    targets = ["q_proj", "v_proj", "down_proj", "output"]
    model = apply_lora(from_pretrained(ckpt, quantize=quantize), targets, 8, 16.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    cpu = torch.device("cpu")
    ref = dpo.reference_log_probs(model, batch, cpu)
    with torch.no_grad():
        base, _ = dpo.policy_log_probs(from_pretrained(ckpt, quantize=quantize), batch, cpu)
        policy, _ = dpo.policy_log_probs(model, batch, cpu)
    assert torch.equal(ref, base)
    assert (policy - ref).abs().max() > 1e-3
    assert all(not m.disabled for m in model.modules() if hasattr(m, "disabled"))  # adapters back on


def test_qlora_dpo_trains_and_saves(tmp_path, make_hf_checkpoint):
    """quantize=nf4 (QLoRA): the same recipe, NF4 base, reference = NF4 base with adapters off."""
    out = tmp_path / "out"
    rows = run(dpo_argv(make_hf_checkpoint("llama3"), out, pairs_file(tmp_path, 8), "quantize=nf4", "max_steps=2",
                        "optimizer.lr=1.0e-2"))
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(rows[1]["loss"]) and rows[1]["grad_norm"] > 0
    assert (out / "step_2" / COMPLETE).is_file() and (out / "step_2" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo", "orpo"])
def test_other_losses_train(tmp_path, make_hf_checkpoint, loss):
    gamma = "loss.gamma=0.5" if loss == "simpo" else "loss.gamma=0.0"
    rows = run(dpo_argv(make_hf_checkpoint("llama3"), tmp_path / "out", pairs_file(tmp_path, 8),
                        f"loss.type={loss}", gamma, "max_steps=2", "optimizer.lr=1.0e-2"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    if loss in ("simpo", "orpo"):  # reference-free: rewards are beta x mean log-prob, negative, not 0
        assert rows[0]["rewards/chosen"] < 0
    else:
        assert rows[0]["rewards/margins"] == 0.0


@pytest.mark.parametrize("override,match", [
    (("loss.type=ipo", "loss.label_smoothing=0.1"), "label_smoothing is not used"),
    (("loss.gamma=0.5",), "only used by loss.type=simpo"),
    (("loss.type=simpo", "precompute_ref_log_probs=true"), "no reference"),
    (("loss.beta=0",), "loss.beta must be > 0"),
    (("loss.type=rrhf",), "rrhf"),
    (("loss.type=kto", "precompute_ref_log_probs=true"), "kto.s KL rows"),
    (("loss.desirable_weight=2.0",), "only used by loss.type=kto"),
])
def test_bad_loss_settings_fail_before_work(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match) as info:
        recipe.main(dpo_argv(tmp_path / "no_ckpt", tmp_path / "out", tmp_path / "none.jsonl", *override))
    assert "\n" not in str(info.value).strip()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("step_*"))


def test_tiny_dpo_as_shipped(tmp_path, capsys):
    out = tmp_path / "out"
    recipe.main(["--config", "tiny/dpo", f"output_dir={out}", "max_steps=2", "heldout_accuracy=4"])
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # first and last always logged
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]  # and the final evaluation
    assert (out / "step_2" / COMPLETE).is_file() and (out / "step_2" / "merged" / "config.json").is_file()
    assert "builtin:tiny/preferences.jsonl" in (out / "config.yaml").read_text()
    printed = capsys.readouterr().out  # the progress lines (stderr is no terminal under pytest)
    assert "step 2/2 loss=" in printed and "acc=" in printed and "margin=" in printed
    assert "held-out accuracy: 0% before -> " in printed and "(n=4, exact match, greedy)" in printed


@pytest.mark.parametrize("kind,cls", [("qwen3", "Qwen3ForCausalLM"), ("gemma3", "Gemma3ForCausalLM"),
                                      ("qwen3_moe", "Qwen3MoeForCausalLM")])
def test_other_families_dpo(tmp_path, make_hf_checkpoint, load_hf_model, kind, cls):
    """DPO on Qwen3 (pairs rendered by Qwen3's own chat template), Gemma 3 and Qwen3-MoE (with
    its load-balancing loss logged): the first step is policy == reference (loss log 2), the
    merged folder loads in transformers as the family with tunelab's logits (fp32, 1e-4)."""
    from tunelab.models import from_pretrained
    from tunelab.models.adapters import load_adapter

    from ..data.chat_templates import write_family_tokenizer

    tokenizer = write_family_tokenizer(tmp_path / "tok", "qwen3") if kind == "qwen3" else TINY_TOKENIZER
    out = tmp_path / "out"
    rows = run(dpo_argv(make_hf_checkpoint(kind), out, pairs_file(tmp_path, 8), "max_steps=2", "save_merged=final",
                        f"tokenizer={tokenizer}", f"lora.targets=[{ALL_TARGETS.removesuffix(',output')}]"))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ("router_aux_loss" in rows[0]) == (kind == "qwen3_moe")  # MoE: the load-balancing loss too
    tokens = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = load_hf_model(out / "step_2" / "merged")
    assert type(merged).__name__ == cls
    with torch.no_grad():
        expected = load_adapter(from_pretrained(make_hf_checkpoint(kind)), out / "step_2" / "adapter").eval()(tokens)
        torch.testing.assert_close(merged(tokens).logits, expected, atol=1e-4, rtol=1e-4)


def test_kto_trains_on_unpaired_rows(tmp_path, make_hf_checkpoint):
    """loss.type=kto with tunelab.data.kto_dataset rows: the loss falls, the log has the
    desirable/undesirable rewards, their margin and the KL estimate; a paired dataset for kto
    (and a KTO dataset for a paired loss) is one line naming the builder to use."""
    rows = [{"prompt": f"Say {w}.", "completion": w if i % 2 == 0 else w[::-1], "label": i % 2 == 0}
            for i, w in enumerate(["apple", "river", "stone", "cloud", "tiger", "candle", "garden", "window"] * 2)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kto = ("loss.type=kto", "dataset._component_=tunelab.data.kto_dataset", "heldout_accuracy=null")
    out = tmp_path / "out"
    logged = run(dpo_argv(make_hf_checkpoint("llama3"), out, data, *kto, "epochs=3", "optimizer.lr=1.0e-2"))
    train = [r for r in logged if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl"} <= set(train[0])
    assert "rewards/accuracy" not in train[0]
    assert sum(r["loss"] for r in train[-3:]) / 3 < train[0]["loss"]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    with pytest.raises(ConfigError, match="loss.type=kto trains on unpaired rows"):
        run(dpo_argv(make_hf_checkpoint("llama3"), tmp_path / "o2", pairs_file(tmp_path, 8), "loss.type=kto",
                     "heldout_accuracy=null"))
    with pytest.raises(ConfigError, match="loss.type=sigmoid trains on preference pairs"):
        run(dpo_argv(make_hf_checkpoint("llama3"), tmp_path / "o3", data, "dataset._component_=tunelab.data.kto_dataset"))
