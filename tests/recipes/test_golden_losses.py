"""Each training recipe's losses on the built-in tiny model, against values recorded before the
architecture step (issue 20) restructured the recipes: the restructuring must not move a bit.

The runs cover what the shared spine does for every recipe: gradient accumulation, LoRA dropout
(RNG), activation checkpointing, validation, a mid-run save, and for the FSDP recipes two CPU
ranks (gloo). The values in ``golden_losses.json`` were written by this file with
``TUNELAB_RECORD_GOLDEN=1`` at commit 6aad634 (before the change) with torch 2.13.0 (CPU) on
x86_64, and matched bit for bit after it. They were recorded again when the demo's tiny model
and data changed on purpose (issue 25: model v2, word tasks), the recipes' math unchanged. On that platform they must match exactly; elsewhere (another torch build or CPU, whose
kernels may sum in another order) to a relative 1e-5, which a change in the training math
(a missing scale, a wrong token count, a different dropout mask) exceeds by orders.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).with_name("golden_losses.json")
RECORD = os.environ.get("TUNELAB_RECORD_GOLDEN") == "1"
KEYS = ("loss", "eval_loss", "grad_norm", "rewards/accuracy", "rewards/margins", "eval_rewards/margins")

# recipe, config, world size, overrides (shared ones below)
RUNS = {
    "lora_single": ("lora_finetune_single_device", "tiny/lora", 1, ("batch_size=4", "heldout_accuracy=null")),
    "qlora_single": ("lora_finetune_single_device", "tiny/qlora", 1, ("batch_size=4", "heldout_accuracy=null")),
    "lora_distributed": ("lora_finetune_distributed", "tiny/lora_distributed", 2, ("batch_size=2",)),
    "dpo_single": ("lora_dpo_single_device", "tiny/dpo", 1, ("batch_size=4", "heldout_accuracy=null")),
    "dpo_distributed": ("lora_dpo_distributed", "tiny/dpo_distributed", 2, ("batch_size=2",)),
}
COMMON = ("max_steps=4", "gradient_accumulation_steps=2", "lora.dropout=0.1", "activation_checkpointing=true",
          "log_every_n_steps=1", "eval_every_n_steps=2", "save_every_n_steps=2", "save_merged=never",
          "max_seq_len=64")


def _platform() -> str:
    return f"torch {torch.__version__} {platform.machine()}"


def _rows(out: Path) -> list[dict]:
    from tunelab.training.metrics import read_metrics

    return [{k: r[k] for k in ("step", *KEYS) if k in r} for r in read_metrics(out / "metrics.jsonl")]


def _run(name: str, out: Path, dt) -> list[dict]:
    recipe, config, world, extra = RUNS[name]
    argv = ["--config", config, f"output_dir={out}", *COMMON, *extra]
    if world == 1:
        import importlib

        importlib.import_module(f"tunelab.recipes.{recipe}").main(argv)
    else:
        run = dt.torchrun(world, dt.REPO / "recipes" / f"{recipe}.py", *argv, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    return _rows(out)


@pytest.fixture
def dt():
    """torchrun from the distributed tests' helpers (conftest files cannot be imported by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dist_conftest", Path(__file__).parents[1] / "distributed" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from types import SimpleNamespace

    return SimpleNamespace(torchrun=mod.torchrun, REPO=mod.REPO)


@pytest.mark.parametrize("name", list(RUNS))
def test_losses_match_the_recorded_ones(name, tmp_path, dt):
    rows = _run(name, tmp_path / "out", dt)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    if RECORD:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden["platform"] = _platform()
        golden[name] = rows
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        return
    golden = json.loads(GOLDEN.read_text())
    expected = golden[name]
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
    if golden["platform"] == _platform():
        assert rows == expected  # bit-identical: floats round-trip through JSON exactly
    else:
        for got, want in zip(rows, expected):
            assert got == pytest.approx(want, rel=1e-5)
