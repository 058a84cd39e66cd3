"""`tune run/ls/cp/cat/validate`, in-process against a temporary recipe + configs.

The registry's recipe folder and the built-in configs folder are pointed at tmp_path, so these
tests do not depend on the real recipes (and never run training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tunelab.recipes.registry as registry
import tunelab.training.config as config_module
from tunelab.cli import run as run_module
from tunelab.cli.main import main
from tunelab.cli.run import build_torchrun_cmd, parse_run_args
from tunelab.errors import ConfigError

RECIPE = textwrap.dedent(
    '''\
    """Test recipe: prints its parsed settings as JSON."""
    from __future__ import annotations

    import json
    from dataclasses import dataclass
    from typing import Literal

    from tunelab.training.config import (
        component_field, config_to_dict, parse_recipe_args, recipe_entry,
    )


    @dataclass(kw_only=True)
    class LoRAConfig:
        rank: int
        alpha: float


    @dataclass(kw_only=True)
    class RecipeConfig:
        checkpoint_dir: str
        tokenizer: str | None
        dtype: Literal["bf16", "fp32"]
        lora: LoRAConfig
        optimizer: dict = component_field(provided=("params",))
        dataset: dict | None = None
        validation: dict | None = None


    def main(argv):
        cfg = parse_recipe_args(argv, RecipeConfig)
        print("PARSED " + json.dumps(config_to_dict(cfg), sort_keys=True))


    if __name__ == "__main__":
        recipe_entry(main)
    '''
)


def _config_yaml(checkpoint_dir: str) -> str:
    return textwrap.dedent(
        f"""\
        # Run with: tune run lora_finetune_single_device --config tiny/lora
        checkpoint_dir: {checkpoint_dir}
        tokenizer: null
        dtype: bf16
        lora: {{rank: 8, alpha: 16}}
        optimizer: {{_component_: torch.optim.AdamW, lr: 2.0e-4}}
        dataset: {{source: "builtin:tiny/train.jsonl"}}
        validation: null
        """
    )


@pytest.fixture
def fake_builtins(tmp_path, monkeypatch):
    """Registry recipes + built-in configs living in tmp_path."""
    recipes = tmp_path / "recipes"
    configs = tmp_path / "configs"
    recipes.mkdir()
    (configs / "tiny").mkdir(parents=True)
    (configs / "llama3_1").mkdir()
    (recipes / "lora_finetune_single_device.py").write_text(RECIPE)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (configs / "tiny" / "lora.yaml").write_text(_config_yaml("builtin:tiny"))
    (configs / "llama3_1" / "8B_lora_single_device.yaml").write_text(_config_yaml(str(ckpt)))
    monkeypatch.setattr(registry, "recipes_dir", lambda: recipes)
    monkeypatch.setattr(config_module, "configs_dir", lambda: configs)
    return dict(recipes=recipes, configs=configs, ckpt=ckpt)


def _parsed(out: str) -> dict:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("PARSED ")]
    return json.loads(line[len("PARSED ") :])


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------- ls / cat / cp


def test_ls_lists_only_existing(fake_builtins, capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "lora_finetune_single_device" in out
    assert "tiny/lora" in out and "llama3_1/8B_lora_single_device" in out
    assert "llama2/7B_lora_single_device" not in out  # registered but no YAML
    assert "generate" not in out  # recipe file missing
    assert "lora_dpo_single_device" not in out


def test_cat(fake_builtins, capsys):
    assert main(["cat", "tiny/lora"]) == 0
    assert capsys.readouterr().out == (fake_builtins["configs"] / "tiny/lora.yaml").read_text()
    assert main(["cat", "tiny/lroa"]) == 1
    assert "did you mean 'tiny/lora'" in _one_error(capsys.readouterr().err)


def test_cp_config_and_recipe(fake_builtins, tmp_path, capsys):
    dest = tmp_path / "work"
    dest.mkdir()
    assert main(["cp", "tiny/lora", str(dest)]) == 0  # into a folder
    assert (dest / "lora.yaml").read_text() == (fake_builtins["configs"] / "tiny/lora.yaml").read_text()
    assert main(["cp", "tiny/lora", str(dest / "mine")]) == 0  # suffix added
    assert (dest / "mine.yaml").exists()
    assert main(["cp", "lora_finetune_single_device", str(dest / "my_recipe")]) == 0
    assert (dest / "my_recipe.py").read_text() == RECIPE
    capsys.readouterr()
    # refuses to overwrite ...
    (dest / "mine.yaml").write_text("edited: true\n")
    assert main(["cp", "tiny/lora", str(dest / "mine.yaml")]) == 1
    assert "--force" in _one_error(capsys.readouterr().err)
    assert (dest / "mine.yaml").read_text() == "edited: true\n"
    # ... unless --force
    assert main(["cp", "tiny/lora", str(dest / "mine.yaml"), "--force"]) == 0
    assert "edited" not in (dest / "mine.yaml").read_text()
    assert main(["cp", "nope/thing", str(dest)]) == 1
    assert "no built-in recipe or config named 'nope/thing'" in _one_error(capsys.readouterr().err)


def test_cp_ambiguous_name(fake_builtins, tmp_path, capsys):
    (fake_builtins["recipes"] / "generate.py").write_text(RECIPE)
    (fake_builtins["configs"] / "generate.yaml").write_text("a: 1\n")
    assert main(["cp", "generate", str(tmp_path / "g")]) == 1
    assert "both a recipe and a config" in _one_error(capsys.readouterr().err)
    assert main(["cp", "generate", str(tmp_path / "g.yaml")]) == 0
    assert (tmp_path / "g.yaml").read_text() == "a: 1\n"
    assert main(["cp", "generate", str(tmp_path / "g.py")]) == 0
    assert (tmp_path / "g.py").read_text() == RECIPE


# ---------------------------------------------------------------------------- validate


def test_validate_good(fake_builtins, capsys):
    assert main(["validate", "tiny/lora"]) == 0
    assert capsys.readouterr().out.strip() == "config OK"
    assert main(["validate", "llama3_1/8B_lora_single_device", "lora.rank=4"]) == 0


def test_validate_reports_every_problem(fake_builtins, capsys):
    rc = main(
        [
            "validate",
            "llama3_1/8B_lora_single_device",
            "lora.rnak=4",
            "dtype=fp8",
            "optimizer.lrr=1e-3",
            "checkpoint_dir=/no/such/dir",
            "tokenizer=/no/tok.model",
            "dataset.source=./missing.jsonl",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err)
    text = "\n".join(err)
    assert "unknown config key 'lora.rnak' — did you mean 'lora.rank'?" in text
    assert "'dtype' = 'fp8'" in text
    assert "'optimizer.lrr'" in text and "did you mean 'optimizer.lr'" in text
    assert "checkpoint_dir '/no/such/dir' does not exist" in text and "tune download" in text
    assert "tokenizer '/no/tok.model' does not exist" in text
    assert "dataset.source './missing.jsonl' does not exist" in text
    assert len(err) == 6


def test_validate_dataset_sources(fake_builtins, tmp_path, capsys):
    assert main(["validate", "tiny/lora", "dataset.source=tatsu-lab/alpaca"]) == 0  # hub id
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert main(["validate", "tiny/lora", f"dataset.source={data}"]) == 0
    capsys.readouterr()
    for bad in ("mydata", "data/alpaca.json", "a/b/c"):
        assert main(["validate", "tiny/lora", f"dataset.source={bad}"]) == 1
        assert f"dataset.source '{bad}' does not exist" in _one_error(capsys.readouterr().err)


def test_validate_copied_config(fake_builtins, tmp_path, capsys):
    assert main(["cp", "tiny/lora", str(tmp_path / "mine.yaml")]) == 0
    # the recipe is found from the config's "tune run <recipe>" comment
    assert main(["validate", str(tmp_path / "mine.yaml")]) == 0
    bare = tmp_path / "bare.yaml"
    bare.write_text(_config_yaml("builtin:tiny").split("\n", 1)[1])
    capsys.readouterr()
    assert main(["validate", str(bare)]) == 1
    assert "--recipe" in _one_error(capsys.readouterr().err)
    assert main(["validate", str(bare), "--recipe", "lora_finetune_single_device"]) == 0
    recipe_copy = tmp_path / "r.py"
    recipe_copy.write_text(RECIPE)
    assert main(["validate", str(bare), "--recipe", str(recipe_copy), "lora.alpha=1"]) == 0


def test_validate_missing_config(fake_builtins, capsys):
    assert main(["validate", "tiny/nope"]) == 1
    assert "tune ls" in _one_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------- run


def test_run_builtin_in_process_with_overrides(fake_builtins, capsys):
    rc = main(
        ["run", "lora_finetune_single_device", "--config", "tiny/lora",
         "lora.rank=4", "optimizer.lr=1e-4", "~dataset", "tokenizer=/tok"]
    )
    assert rc == 0
    parsed = _parsed(capsys.readouterr().out)
    assert parsed["lora"] == {"rank": 4, "alpha": 16.0}
    assert parsed["optimizer"] == {"_component_": "torch.optim.AdamW", "lr": 1e-4}
    assert parsed["dataset"] is None  # removed with ~dataset -> the dataclass default
    assert parsed["tokenizer"] == "/tok"


def test_run_copied_recipe_and_config(fake_builtins, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "lora_finetune_single_device", "copied.py"]) == 0
    assert main(["cp", "tiny/lora", "copied.yaml"]) == 0
    assert main(["run", "./copied.py", "--config", "./copied.yaml", "dtype=fp32"]) == 0
    assert _parsed(capsys.readouterr().out)["dtype"] == "fp32"


def test_run_bad_override_is_one_line(fake_builtins, capsys):
    rc = main(["run", "lora_finetune_single_device", "--config", "tiny/lora", "lora.rnak=4"])
    assert rc == 1
    assert "did you mean 'lora.rank'" in _one_error(capsys.readouterr().err)


def test_run_input_errors(fake_builtins, capsys):
    assert main(["run", "lora_finetune_single_devce", "--config", "tiny/lora"]) == 1
    assert "did you mean 'lora_finetune_single_device'" in _one_error(capsys.readouterr().err)
    assert main(["run", "lora_finetune_single_device"]) == 1
    assert "missing --config" in _one_error(capsys.readouterr().err)
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/nope"]) == 1
    assert "not found" in _one_error(capsys.readouterr().err)
    assert main(["run", "./nope.py", "--config", "tiny/lora"]) == 1
    assert "not found" in _one_error(capsys.readouterr().err)
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora", "--foo"]) == 1
    assert "unknown option '--foo'" in _one_error(capsys.readouterr().err)


def test_parse_run_args_torchrun_flags():
    args = parse_run_args(
        ["--nproc_per_node", "2", "--standalone", "--nnodes=1", "my_recipe", "--config", "c",
         "a=1", "~b"]
    )
    assert args.launcher_flags == ["--nproc_per_node", "2", "--standalone", "--nnodes=1"]
    assert (args.recipe, args.config, args.overrides) == ("my_recipe", "c", ["a=1", "~b"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_run_args(["--nproc_per_node"])
    with pytest.raises(ConfigError, match="missing RECIPE"):
        parse_run_args(["--standalone"])


def test_run_with_torchrun_flags_execs_torchrun(fake_builtins, monkeypatch):
    calls = []
    monkeypatch.setattr(run_module, "_exec", lambda cmd: calls.append(cmd))
    rc = main(["run", "--nproc_per_node", "2", "lora_finetune_single_device", "--config",
               "tiny/lora", "lora.rank=4"])
    assert rc == 0
    (cmd,) = calls
    recipe = (fake_builtins["recipes"] / "lora_finetune_single_device.py").resolve()
    config = (fake_builtins["configs"] / "tiny/lora.yaml").resolve()
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   str(recipe), "--config", str(config), "lora.rank=4"]
    assert cmd == build_torchrun_cmd(["--nproc_per_node", "2"], recipe, config, ["lora.rank=4"])


def test_distributed_recipe_defaults_to_torchrun(fake_builtins, monkeypatch, capsys):
    (fake_builtins["recipes"] / "lora_finetune_distributed.py").write_text(RECIPE)
    calls = []
    monkeypatch.setattr(run_module, "_exec", lambda cmd: calls.append(cmd))
    assert main(["run", "lora_finetune_distributed", "--config", "tiny/lora"]) == 0
    (cmd,) = calls
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node", "1",
                        str((fake_builtins["recipes"] / "lora_finetune_distributed.py").resolve())]
    assert "torchrun" in capsys.readouterr().err


def test_usage_errors_are_one_line(capsys):
    assert main(["bogus"]) == 1
    assert _one_error(capsys.readouterr().err).startswith("error: argument COMMAND")
    assert main(["cp", "only_one"]) == 1
    _one_error(capsys.readouterr().err)
    assert main([]) == 0  # prints help


# ---------------------------------------------------------------------------- real entry point


def test_tune_entry_point_subprocess(tmp_path):
    """The installed `tune` script runs a copied recipe with a path config (real process)."""
    recipe = tmp_path / "r.py"
    recipe.write_text(RECIPE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config_yaml("builtin:tiny"))
    tune = Path(sys.executable).parent / "tune"
    cmd = [str(tune)] if tune.exists() else [sys.executable, "-m", "tunelab.cli.main"]
    env = dict(os.environ, PYTHONSAFEPATH="1")
    ok = subprocess.run(cmd + ["run", str(recipe), "--config", str(cfg), "lora.alpha=2"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert _parsed(ok.stdout)["lora"]["alpha"] == 2.0
    # bad input fails before torch is imported: cheap, and shows no traceback
    bad = subprocess.run(cmd + ["run", str(recipe), "--config", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "not found" in _one_error(bad.stderr)


@pytest.mark.parametrize("override,words", [
    ("batch_size=-1", "batch_size must be >= 1"),
    ("optimizer.betas=[]", "refused its config values"),
    ("optimizer.lr=-1", "Invalid learning rate"),
    ("lora.alpha=1:30", "lora.alpha"),
])
def test_validate_refuses_what_the_run_would(override, words, capsys):
    """tune validate runs the recipe's own checks and builds the optimizer: a config it passes
    does not fail the run on these values (each was 'config OK' before, then a crash)."""
    from tunelab.cli.main import main

    assert main(["validate", "tiny/lora", override]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_ls_into_a_pipe_that_closes_early_is_quiet():
    """`tune ls | head -1`: the reader is gone before tune writes (a pipe whose read end is
    closed): no BrokenPipeError traceback, exit code 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli.main", "ls"], stdout=write_end,
                          stderr=subprocess.PIPE, env=dict(os.environ, PYTHONSAFEPATH="1"), timeout=60)
    os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
