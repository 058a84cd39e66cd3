"""Generated bad values for every key of a shipped config: ``tune validate`` answers each with
one-line errors, and whatever it accepts the run accepts too (it trains a step without a
configuration error): validate and run agree."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tunelab.cli.validate import validate_config
from tunelab.training.config import load_config

BAD = ["-1", "0", "abc", "[]", "{}", "{a: 1}", "1.5", "true", "null", "1e309", "-0.5", "[1, [2]]", "${seed}"]


def _leaf_keys(config: str) -> list[str]:
    """Every key of the config, groups opened (a _component_ node's keys are its arguments)."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return [k for k in walk(OmegaConf.to_container(load_config(config)), "") if k != "output_dir"]


@pytest.fixture(scope="module")
def accepted(tmp_path_factory) -> list[str]:
    """Overrides of tiny/lora that validate accepts (each checked for one-line errors on the way)."""
    out = tmp_path_factory.mktemp("fuzz") / "out"
    found = []
    for key in _leaf_keys("tiny/lora"):
        for value in BAD:
            errors = validate_config("tiny/lora", [f"{key}={value}", f"output_dir={out}"])
            assert all(isinstance(e, str) and e and "\n" not in e and "Traceback" not in e for e in errors), \
                (key, value, errors)
            if not errors:
                found.append(f"{key}={value}")
    return found


def test_dpo_keys_get_one_line_errors(tmp_path):
    for key in [k for k in _leaf_keys("tiny/dpo") if k.startswith(("loss.", "precompute"))]:
        for value in BAD:
            errors = validate_config("tiny/dpo", [f"{key}={value}", f"output_dir={tmp_path / 'out'}"])
            assert all("\n" not in e for e in errors), (key, value, errors)


@pytest.mark.timeout(400)
def test_what_validate_accepts_the_run_accepts(accepted, tmp_path, monkeypatch):
    from tunelab.recipes import lora_finetune_single_device as recipe

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    assert accepted and len(accepted) < 40  # most bad values are refused
    for i, override in enumerate(accepted):
        # the 100-row split first (the fuzzed override may replace it): building 8,000 rows per run
        # would be most of this test's time
        recipe.main(["--config", "tiny/lora", "dataset.source=builtin:tiny/validation.jsonl", override,
                     "max_steps=1", "save_merged=never", "validation=null", f"output_dir={tmp_path / str(i)}"] + (["export_gguf=null"] if "export_gguf" not in override else []))


def test_fsdp_keys_get_one_line_errors(tmp_path):
    """The FSDP recipes' own keys (fsdp.*, dist_timeout_s) under the same generated values."""
    for key in [k for k in _leaf_keys("tiny/lora_distributed") if k.startswith(("fsdp.", "dist_timeout_s", "device"))]:
        for value in BAD:
            errors = validate_config("tiny/lora_distributed", [f"{key}={value}", f"output_dir={tmp_path / 'out'}"])
            assert all("\n" not in e and "Traceback" not in e for e in errors), (key, value, errors)
            if key in ("dist_timeout_s", "fsdp.prefetch_layers") and value in ("-1", "abc", "1.5", "{}"):
                assert errors, (key, value)
