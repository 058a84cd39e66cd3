"""The `export_gguf: {dtype: ...}` config step at the end of training, and its early checks."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest

from tunelab.errors import ConfigError
from tunelab.recipes import lora_finetune_single_device as recipe

BASE = ["--config", "tiny/lora", "max_steps=2", "validation=null", "eval_every_n_steps=null"]


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_export_step_from_merged_and_from_base_plus_adapter(tmp_path, capsys):
    """save_merged=final exports the merged folder; save_merged=never merges base + adapter while
    exporting. Same training, so the same f16 tensors (both merges are fp32, then one f16 cast)."""
    runs = {}
    for merged in ("final", "never"):
        out = tmp_path / merged
        recipe.main([*BASE, f"output_dir={out}", f"save_merged={merged}", "export_gguf.dtype=f16"])
        gguf_file = out / "step_2" / "model-f16.gguf"
        assert gguf_file.is_file() and (out / "step_2" / "model-f16.Modelfile").is_file()
        assert f"gguf: {gguf_file}" in capsys.readouterr().out
        runs[merged] = _tensors(gguf_file)
    assert runs["final"].keys() == runs["never"].keys()
    for name, a in runs["final"].items():
        np.testing.assert_array_equal(a, runs["never"][name], err_msg=name)


def test_resumed_finished_run_keeps_its_gguf(tmp_path, capsys):
    out = tmp_path / "run"
    recipe.main([*BASE, f"output_dir={out}", "save_merged=never", "export_gguf.dtype=q8_0"])
    gguf_file = out / "step_2" / "model-q8_0.gguf"
    before = gguf_file.stat().st_mtime_ns
    recipe.main([*BASE, f"output_dir={out}", "save_merged=never", "export_gguf.dtype=q8_0", "resume=true"])
    assert gguf_file.stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "export_gguf kept it" in printed
    assert f"{out} is finished (step_2 is the last of its 2 steps): nothing to train" in printed
    assert "step 1/" not in printed.split("is finished")[1]  # no step ran


def test_bad_export_settings_fail_before_training(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="export_gguf.dtype"):
        recipe.main([*BASE, f"output_dir={tmp_path / 'a'}", "export_gguf.dtype=q3_k"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[gguf\]'"):
        recipe.main([*BASE, f"output_dir={tmp_path / 'b'}", "export_gguf.dtype=f16"])
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_offload_needs_checkpointing_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match="offload_activations"):
        recipe.main([*BASE, f"output_dir={tmp_path}", "offload_activations=true", "activation_checkpointing=false"])
