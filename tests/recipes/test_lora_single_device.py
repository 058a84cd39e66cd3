"""lora_finetune_single_device end to end on transformers-written checkpoints (CPU, fp32)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import ConfigError
from tunelab.training.checkpointing import COMPLETE


# with the LM head adapted too (PEFT: lm_head), the loss of a random model falls quickly
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,output"


def _tokens(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 700, (2, n), generator=g)


def test_end_to_end_adapter_and_merged_match_transformers(tmp_path, make_hf_checkpoint, load_hf_model, rt, capsys):
    """Loss falls; the PEFT adapter and the merged folder reproduce tunelab's logits in
    transformers. Tolerance 1e-4: fp32, same math, only summation order differs."""
    from peft import PeftModel

    from tunelab.models import from_pretrained
    from tunelab.models.adapters import load_adapter

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    rows = rt.run_lora(rt.lora_argv(ckpt, out, data, "epochs=4", "optimizer.lr=1.0e-2",
                                       f"lora.targets=[{ALL_TARGETS}]"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 17))
    assert set(train_rows[0]) >= {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm"}
    assert train_rows[0]["lr"] == pytest.approx(1e-2)  # the lr step 1 used (warmup_steps=1)
    assert train_rows[-1]["lr"] < 1e-3  # cosine decay towards 0 at the last step
    first, last = train_rows[0]["loss"], sum(r["loss"] for r in train_rows[-4:]) / 4
    assert last < first - 1.0, (first, last)

    step_dir = out / "step_16"
    assert (step_dir / COMPLETE).is_file() and (out / "config.yaml").is_file()
    assert sorted(p.name for p in step_dir.iterdir()) == ["COMPLETE", "adapter", "merged", "state"]
    stdout = capsys.readouterr().out
    assert str(step_dir / "adapter") in stdout and "(expected " in stdout  # held-out answers
    cfg = json.loads((step_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["task_type"] == "CAUSAL_LM"

    tokens = _tokens()
    ours = load_adapter(from_pretrained(ckpt), step_dir / "adapter").eval()
    with torch.no_grad():
        expected = ours(tokens)
        peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), step_dir / "adapter").eval()
        torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-4, rtol=1e-4)
        merged = load_hf_model(step_dir / "merged")
        torch.testing.assert_close(merged(tokens).logits, expected, atol=1e-4, rtol=1e-4)
    # the training changed something (B starts at zero)
    base = load_hf_model(ckpt)
    with torch.no_grad():
        assert (base(tokens).logits - expected).abs().max() > 1e-3
    assert (step_dir / "merged" / "tokenizer.model").is_file()  # the tokenizer travels along


def test_resume_gives_identical_losses_and_adapter(tmp_path, make_hf_checkpoint, rt):
    """6 steps straight vs 3 + resume to 6 (crossing an epoch, with LoRA dropout so the RNG
    state matters): bit-identical on CPU fp32."""
    ckpt = make_hf_checkpoint("llama2")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    extra = ("max_steps=6", "epochs=3", "save_every_n_steps=3", "lora.dropout=0.1", "save_merged=never")
    straight = rt.run_lora(rt.lora_argv(ckpt, tmp_path / "a", data, *extra))

    out = tmp_path / "b"
    rt.run_lora(rt.lora_argv(ckpt, out, data, *extra))
    import shutil

    shutil.rmtree(out / "step_6")  # as if killed after the step-3 checkpoint
    resumed = rt.run_lora(rt.lora_argv(ckpt, out, data, *extra, "resume=true"))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    a = load_file(tmp_path / "a" / "step_6" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "step_6" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accumulation_normalises_by_tokens(tmp_path, make_hf_checkpoint, rt):
    """batch 4 x accum 1 == batch 2 x accum 2 with unequal sample lengths: same losses, grad
    norms and adapter (fp32; 1e-5 covers the different summation order)."""
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16, seed=3))
    # eps 1e-6: Adam divides by sqrt(v) + eps, so at eps 1e-8 a weight whose gradient is ~1e-8
    # turns summation-order noise into a visible update difference
    common = ("max_steps=3", "save_merged=never", "optimizer.lr=1.0e-2", "optimizer.eps=1.0e-6")
    one = rt.run_lora(rt.lora_argv(ckpt, tmp_path / "one", data, *common, "batch_size=4"))
    two = rt.run_lora(rt.lora_argv(ckpt, tmp_path / "two", data, *common, "batch_size=2",
                                   "gradient_accumulation_steps=2"))
    for r1, r2 in zip(one, two):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4, abs=1e-6)
    a = load_file(tmp_path / "one" / "step_3" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "step_3" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, make_hf_checkpoint, rt):
    from tunelab.errors import TunelabError

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    argv = rt.lora_argv(ckpt, out, data, "max_steps=4", "save_every_n_steps=1", "optimizer.lr=1.0e30",
                        "max_grad_norm=null", "lr_scheduler.schedule=constant", "lr_scheduler.warmup_steps=0")
    with pytest.raises(TunelabError, match="not finite") as info:
        rt.run_lora(argv)
    msg = str(info.value)
    assert "\n" not in msg and "last good checkpoint" in msg
    steps = sorted(int(p.name.split("_")[1]) for p in out.glob("step_*"))
    assert steps and all((out / f"step_{s}" / COMPLETE).is_file() for s in steps)
    assert f"step_{steps[-1]}" in msg


def test_keep_last_n_and_complete_marker(tmp_path, make_hf_checkpoint, rt, capsys):
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    argv = rt.lora_argv(ckpt, out, data, "max_steps=4", "save_every_n_steps=1", "keep_last_n_checkpoints=2",
                        "save_merged=never")
    rt.run_lora(argv)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3", "step_4"]
    # a folder without COMPLETE is ignored: resume starts from step_3 and redoes step 4
    (out / "step_4" / COMPLETE).unlink()
    with pytest.raises(ConfigError, match="batch_size=4"):  # the data position counts batches of 4
        rt.run_lora(argv + ["resume=true", "batch_size=2"])
    rows = rt.run_lora(argv + ["resume=true"])
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "step_4" / COMPLETE).is_file()


def test_bad_rows_are_skipped_and_counted(tmp_path, make_hf_checkpoint, rt, capsys):
    ckpt = make_hf_checkpoint("llama3")
    rows = rt.alpaca_rows(12) + ["{not json", {"instruction": "x", "input": "", "output": ""}]
    data = rt.write_jsonl(tmp_path / "train.jsonl", rows)
    rt.run_lora(rt.lora_argv(ckpt, tmp_path / "out", data, "max_steps=1", "save_merged=never"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("dataset:"))
    assert "12 samples" in line and "skipped 2" in line


@pytest.mark.parametrize(
    "config,kind",
    [
        ("llama2/7B_lora_single_device", "llama2"),
        ("llama3/8B_lora_single_device", "llama3"),
        ("llama3_1/8B_lora_single_device", "llama3_1"),
        ("llama3_1/8B_qlora_long_context", "llama3_1"),
        ("llama3_2/1B_lora_single_device", "llama3_2"),
        ("llama3_2/3B_lora_single_device", "llama3_2"),
        ("gemma3/4B_lora_single_device", "gemma3_mm"),
        ("gemma3/12B_qlora_single_device", "gemma3_mm"),
        ("mistral/7B_lora_single_device", "mistral"),
        ("mistral/nemo_12B_qlora_single_device", "mistral_nemo"),
        ("phi3/mini_lora_single_device", "phi3_longrope"),
        ("phi4/14B_qlora_single_device", "phi3"),
        ("qwen2_5/7B_lora_single_device", "qwen2"),
        ("qwen3/8B_qlora_single_device", "qwen3"),
        ("qwen3_moe/30B_A3B_qlora_single_device", "qwen3_moe"),
        ("gpt_oss/20B_lora_single_device", "gpt_oss_mxfp4"),
        ("gpt_oss/20B_qlora_single_device", "gpt_oss_mxfp4"),
    ],
)
def test_shipped_configs_run_on_cpu(config, kind, tmp_path, make_hf_checkpoint, rt, capsys):
    """The shipped configs run unchanged on a tiny checkpoint; CUDA-only settings switch off
    with a one-line notice."""
    from tunelab.recipes import lora_finetune_single_device as recipe
    from tunelab.training.config import load_config

    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(40))
    out = tmp_path / "out"
    recipe.main(["--config", config, "device=cpu", f"checkpoint_dir={make_hf_checkpoint(kind)}",
                 f"tokenizer={rt.TINY_TOKENIZER}", f"dataset.source={data}", "max_steps=1", "max_seq_len=64",
                 f"output_dir={out}"])
    assert (out / "step_1" / COMPLETE).is_file()
    stdout = capsys.readouterr().out
    cfg = load_config(config)
    switched = [key for key in ("compile", "offload_activations", "cuda_graph") if cfg.get(key)]
    if switched:
        assert f"notice: {', '.join(switched)} switched off on cpu (needs CUDA)" in stdout.splitlines()


POISON_OPTIMIZER = '''
import torch


class PoisonAdamW(torch.optim.AdamW):
    """AdamW whose step number ``poison_at`` leaves nan in the weights (a finite loss and
    gradient, then a bad update: what only a check after the step can see)."""

    def __init__(self, params, poison_at: int = 2, **kwargs):
        super().__init__(params, **kwargs)
        self.poison_at, self.steps = poison_at, 0

    def step(self, closure=None):
        out = super().step(closure)
        self.steps += 1
        if self.steps == self.poison_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out
'''


def test_non_finite_weights_are_never_saved(tmp_path, make_hf_checkpoint, rt, monkeypatch):
    """The update of step 2 leaves nan in a LoRA weight: the step-2 save refuses (one line
    naming the step and the newest checkpoint) and step_1 stays the newest COMPLETE one."""
    from tunelab.errors import TunelabError

    (tmp_path / "poison_opt.py").write_text(POISON_OPTIMIZER)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    argv = rt.lora_argv(ckpt, out, data, "max_steps=4", "save_every_n_steps=1", "save_merged=never",
                        "optimizer._component_=poison_opt.PoisonAdamW", "optimizer.poison_at=2",
                        "allowed_components=[poison_opt.PoisonAdamW]")
    with pytest.raises(TunelabError, match="nan/inf after step 2") as info:
        rt.run_lora(argv)
    msg = str(info.value)
    assert "\n" not in msg and str(out / "step_1") in msg
    assert sorted(p.name for p in out.glob("step_*")) == ["step_1"] and (out / "step_1" / COMPLETE).is_file()


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, make_hf_checkpoint, rt, capsys):
    """A file of the newest COMPLETE checkpoint deleted (or cut short): resume says what is wrong,
    continues from the newest intact one and ends as an uninterrupted run; with nothing intact
    it is a one-line error."""
    from tunelab.errors import TunelabError

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    extra = ("max_steps=3", "save_every_n_steps=1", "keep_last_n_checkpoints=2", "save_merged=never")
    straight = rt.run_lora(rt.lora_argv(ckpt, tmp_path / "a", data, *extra))
    out = tmp_path / "b"
    rt.run_lora(rt.lora_argv(ckpt, out, data, *extra))
    (out / "step_3" / "state" / "rng.json").unlink()
    capsys.readouterr()
    resumed = rt.run_lora(rt.lora_argv(ckpt, out, data, *extra, "resume=true"))
    stdout = capsys.readouterr().out
    assert "warning: step_3: state/rng.json is missing" in stdout and f"resumed from {out / 'step_2'}" in stdout
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    # a state file damaged in place (same size, so the manifest cannot tell): it does not load,
    # and resume falls back to the older checkpoint the same way
    state = out / "step_3" / "state" / "optimizer.safetensors"
    state.write_bytes(b"\xff" * 16 + state.read_bytes()[16:])
    capsys.readouterr()
    again = rt.run_lora(rt.lora_argv(ckpt, out, data, *extra, "resume=true"))
    stdout = capsys.readouterr().out
    assert "state is damaged" in stdout and "resuming from step_2 instead" in stdout
    assert [r["loss"] for r in again if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    for step in (2, 3):  # every checkpoint damaged: nothing to resume from
        path = out / f"step_{step}" / "adapter" / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(TunelabError, match="no intact checkpoint") as info:
        rt.run_lora(rt.lora_argv(ckpt, out, data, *extra, "resume=true"))
    assert "\n" not in str(info.value)


def test_one_run_per_output_dir(tmp_path, make_hf_checkpoint, rt, monkeypatch):
    """The recipe holds output_dir's lock while it runs and drops it after; a folder a live run
    holds is refused in one line before anything is written."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import tunelab.recipes.lora_finetune_single_device as recipe
    from tunelab.run_layout import LOCK, lock_holder

    seen = []
    real = recipe.build_model
    monkeypatch.setattr(recipe, "build_model", lambda run, tok: (seen.append(lock_holder(run.output_dir)),
                                                                 real(run, tok))[1])
    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=1", "save_merged=never"))
    assert seen[0]["pid"] == os.getpid() and not (out / LOCK).exists()

    other = tmp_path / "other"
    other.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        (other / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "start": start}))
        with pytest.raises(ConfigError, match="is in use by the run with pid"):
            rt.run_lora(rt.lora_argv(ckpt, other, data, "max_steps=1"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in other.iterdir()) == [LOCK]  # nothing written, the lock not taken


def test_resume_applies_changed_hyperparameters_and_refuses_fixed_ones(tmp_path, make_hf_checkpoint, rt, capsys):
    """Resumed with optimizer.lr halved (constant schedule): the first resumed step uses the new
    lr, the change is one printed line and config.yaml records it; a changed LoRA rank is
    refused in one line naming the key."""
    import yaml

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    extra = ("save_every_n_steps=2", "save_merged=never", "lr_scheduler.schedule=constant",
             "lr_scheduler.warmup_steps=0", "optimizer.lr=1.0e-3")
    rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=2", *extra))
    capsys.readouterr()
    rows = rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=4", *extra, "optimizer.lr=5.0e-4", "resume=true"))
    assert "resume: changed since the checkpoints: max_steps 2 -> 4; optimizer.lr 0.001 -> 0.0005" in \
        capsys.readouterr().out
    assert {r["step"]: r["lr"] for r in rows if "lr" in r} == {1: 1e-3, 2: 1e-3, 3: 5e-4, 4: 5e-4}
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["lr"] == 5e-4
    with pytest.raises(ConfigError, match=r"resume: lora.rank=16 wrote these checkpoints, 8 now") as info:
        rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=6", *extra, "lora.rank=8", "resume=true"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind,cls,extra", [
    ("mistral", "MistralForCausalLM", ()),
    ("qwen2", "Qwen2ForCausalLM", ()),
    ("qwen2", "Qwen2ForCausalLM", ("quantize=nf4",)),  # QLoRA: the biases stay dense beside NF4
    ("qwen3", "Qwen3ForCausalLM", ()),
    ("qwen3", "Qwen3ForCausalLM", ("quantize=nf4", "activation_checkpointing=true")),  # QLoRA
    ("gemma3", "Gemma3ForCausalLM", ()),
    ("gemma3", "Gemma3ForCausalLM", ("quantize=nf4",)),
    ("gemma3_mm", "Gemma3ForConditionalGeneration", ()),  # Gemma 3 4B+: the text model of an image-text one
    ("phi3", "Phi3ForCausalLM", ()),  # LoRA on the fused qkv_proj / gate_up_proj, as PEFT puts it
    ("phi3_longrope", "Phi3ForCausalLM", ("quantize=nf4",)),
    ("qwen3_moe", "Qwen3MoeForCausalLM", ()),  # LoRA on attention, the dense layer's MLP and the experts
    ("qwen3_moe", "Qwen3MoeForCausalLM", ("quantize=nf4",)),  # NF4 experts, one expert dequantized at a time
    ("gpt_oss", "GptOssForCausalLM", ()),  # LoRA on the biased attention (o_proj too) and the [E, in, out] experts
    ("gpt_oss", "GptOssForCausalLM", ("quantize=nf4",)),  # NF4 experts, each quantized as [out, in]
])
def test_other_families_train_and_export_for_peft_and_transformers(tmp_path, make_hf_checkpoint, load_hf_model,
                                                                   rt, kind, cls, extra):
    """The LoRA recipe on each family's checkpoint: the PEFT adapter on transformers' model and
    the merged folder (saved as the same family) give tunelab's logits (fp32, 1e-4; with an NF4
    base the reference is tunelab's own NF4 model + adapter, as the merge dequantizes)."""
    from peft import PeftModel

    from tunelab.models import from_pretrained
    from tunelab.models.adapters import load_adapter

    ckpt = make_hf_checkpoint(kind)
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(16))
    out = tmp_path / "out"
    targets = ("qkv_proj,o_proj,gate_up_proj,down_proj" if kind.startswith("phi3") else
               "q_proj,k_proj,v_proj,o_proj,experts" if kind == "gpt_oss" else
               "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" + (",experts" if kind == "qwen3_moe" else ""))
    rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=3", "optimizer.lr=1.0e-2", f"lora.targets=[{targets}]",
                             *extra))
    if extra:  # QLoRA: trained and saved; the adapter loads back onto the NF4 base
        adapter = load_adapter(from_pretrained(ckpt, quantize="nf4"), out / "step_3" / "adapter")
        merged = load_hf_model(out / "step_3" / "merged")
        assert type(merged).__name__ == cls
        with torch.no_grad():
            torch.testing.assert_close(merged(_tokens()).logits, adapter.eval()(_tokens()), atol=1e-4, rtol=1e-4)
        return
    step = out / "step_3"
    tokens = _tokens()
    with torch.no_grad():
        expected = load_adapter(from_pretrained(ckpt), step / "adapter").eval()(tokens)
        peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), step / "adapter").eval()
        torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-4, rtol=1e-4)
        merged = load_hf_model(step / "merged")
        assert type(merged).__name__ == cls
        torch.testing.assert_close(merged(tokens).logits, expected, atol=1e-4, rtol=1e-4)


def test_moe_router_aux_loss_is_trained_and_logged(tmp_path, make_hf_checkpoint, rt):
    """Qwen3-MoE in the LoRA recipe: with router_aux_loss on (the default) each step row logs the
    load-balancing loss and its gradient reaches the adapters (checkpointed layers too); the
    cross-entropy of step 1 is the same either way."""
    from tunelab.training.metrics import read_metrics

    ckpt = make_hf_checkpoint("qwen3_moe")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(8))
    rows = {}
    for on in (True, False):
        out = tmp_path / f"aux_{on}"
        rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=2", "save_merged=never", "activation_checkpointing=true",
                                 f"router_aux_loss={str(on).lower()}", "lora.targets=[q_proj,k_proj,v_proj,o_proj]"))
        rows[on] = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["router_aux_loss"] > 0 for r in rows[True]) and "router_aux_loss" not in rows[False][0]
    assert rows[True][0]["loss"] == pytest.approx(rows[False][0]["loss"], rel=1e-6)
    assert rows[True][0]["grad_norm"] != pytest.approx(rows[False][0]["grad_norm"], rel=1e-6)


def test_mlp_tile_tokens_trains_as_untiled(tmp_path, make_hf_checkpoint, rt):
    """``mlp_tile_tokens`` (the sequence-tiled MLP) in the recipe, with activation checkpointing
    and gradient accumulation: the same losses and grad norms as the untiled run (fp32; 1e-5:
    only the weight gradients' summation order over tokens differs), the same adapter after three
    AdamW steps to 1e-4 absolute (Adam divides by the gradient's own scale, so an element whose
    gradient is ~0 can move by a fraction of lr on rounding alone)."""
    from tunelab.training.metrics import read_metrics

    ckpt = make_hf_checkpoint("llama3")
    data = rt.write_jsonl(tmp_path / "train.jsonl", rt.alpaca_rows(8))
    rows, adapters = {}, {}
    for tile in ("null", "7"):
        out = tmp_path / f"tile_{tile}"
        rt.run_lora(rt.lora_argv(ckpt, out, data, "max_steps=3", "save_merged=never", "activation_checkpointing=true",
                                 "gradient_accumulation_steps=2", f"mlp_tile_tokens={tile}",
                                 f"lora.targets=[{ALL_TARGETS}]"))
        rows[tile] = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        adapters[tile] = load_file(out / "step_3" / "adapter" / "adapter_model.safetensors")
    assert len(rows["7"]) == 3
    for got, want in zip(rows["7"], rows["null"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    for name, want in adapters["null"].items():
        torch.testing.assert_close(adapters["7"][name], want, rtol=1e-5, atol=1e-4)


def test_mlp_tile_tokens_below_one_is_refused(tmp_path, make_hf_checkpoint, rt, small_jsonl):
    with pytest.raises(ConfigError, match="mlp_tile_tokens: 0 must be >= 1"):
        rt.run_lora(rt.lora_argv(make_hf_checkpoint("llama3"), tmp_path / "out", small_jsonl, "mlp_tile_tokens=0"))
