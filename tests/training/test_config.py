"""Config loading, overrides, typed parsing and `_component_` nodes (tunelab.training.config)."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.errors import ConfigError
from tunelab.training.config import (
    ConfigErrors,
    apply_overrides,
    check_component,
    component_field,
    config_to_dict,
    instantiate,
    load_config,
    load_recipe_config,
    parse_config,
    parse_recipe_args,
    parse_value,
    recipe_entry,
    resolve_config_path,
    save_config,
)


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: list[str]


@dataclass(kw_only=True)
class SchedulerConfig:
    warmup_steps: int
    schedule: Literal["cosine", "linear", "constant"]


@dataclass(kw_only=True)
class Settings:
    checkpoint_dir: str
    tokenizer: str | None
    seed: int
    max_steps: int | None
    packing: bool
    dtype: Literal["bf16", "fp32"]
    quantize: Literal["nf4"] | None = None
    lora: LoRAConfig
    lr_scheduler: SchedulerConfig
    optimizer: dict = component_field(provided=("params",))
    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
    validation: dict | None = None
    extra: dict = field(default_factory=dict)


YAML = textwrap.dedent(
    """\
    # tune run lora_finetune_single_device --config this
    checkpoint_dir: /ckpt
    tokenizer: null
    seed: 0
    max_steps: null
    packing: false
    dtype: bf16
    lora: {rank: 16, alpha: 32, targets: [q_proj, v_proj]}
    lr_scheduler: {warmup_steps: 10, schedule: cosine}
    optimizer: {_component_: torch.optim.AdamW, lr: 2.0e-4, weight_decay: 0.0}
    dataset:
      _component_: tunelab.training.config._example_dataset
      source: data.json
    validation: null
    """
)


def _example_dataset(tokenizer, *, source, max_seq_len, split="train"):
    return dict(tokenizer=tokenizer, source=source, max_seq_len=max_seq_len, split=split)


# The dataset component in YAML points here (module attribute of an importable module).
import tunelab.training.config as _config_module  # noqa: E402

_config_module._example_dataset = _example_dataset  # type: ignore[attr-defined]
# as if defined there: the component allowlist judges an object by its own module
_example_dataset.__module__ = "tunelab.training.config"


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(YAML)
    return path


def _errors(cfg, schema=Settings) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(cfg, schema)
    return info.value.errors


# ---------------------------------------------------------------------------- loading


def test_load_config_by_path_and_missing(cfg_file, tmp_path):
    cfg = load_config(cfg_file)
    assert cfg.lora.rank == 16 and cfg.optimizer.lr == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="tune ls"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="tune ls"):
        load_config("no_such_family/8B_lora")


def test_load_config_by_builtin_name(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    (root / "fam").mkdir(parents=True)
    (root / "fam" / "small.yaml").write_text("a: 1\n")
    monkeypatch.setattr(_config_module, "configs_dir", lambda: root)
    assert load_config("fam/small").a == 1
    assert load_config("fam/small.yaml").a == 1
    assert resolve_config_path("fam/small") == root / "fam" / "small.yaml"
    with pytest.raises(ConfigError, match="did you mean 'fam/small'"):
        load_config("fam/smal")


def test_load_config_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


# ---------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1e-4", 1e-4),
        ("2.0e-4", 2e-4),
        ("-3E5", -3e5),
        ("5", 5),
        ("0.5", 0.5),
        ("true", True),
        ("null", None),
        ("", None),
        ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
        ("[1e-4, 2]", [1e-4, 2]),
        ("hello world", "hello world"),
        ("a: b: c", "a: b: c"),  # not valid YAML on its own -> kept as a string
        ("1.2.3", "1.2.3"),
        ("2026-01-01", "2026-01-01"),  # like OmegaConf: dates stay strings
    ],
)
def test_parse_value_types(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_overrides_nested_new_and_remove(cfg_file):
    cfg = load_config(cfg_file)
    apply_overrides(
        cfg,
        [
            "optimizer.lr=1e-4",
            "lora.targets=[q_proj]",
            "lr_scheduler.warmup_steps=3",
            "optimizer.betas=[0.9, 0.95]",  # new kwarg under a component node
            "validation._component_=tunelab.training.config._example_dataset",  # null -> group
            "validation.source=val.json",
            "~validation",
            "tokenizer=/tok",
        ],
    )
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert list(cfg.lora.targets) == ["q_proj"]
    assert cfg.lr_scheduler.warmup_steps == 3
    assert list(cfg.optimizer.betas) == [0.9, 0.95]
    assert "validation" not in cfg
    assert cfg.tokenizer == "/tok"
    s = parse_config(cfg, Settings)
    assert s.optimizer["betas"] == [0.9, 0.95] and s.validation is None


def test_override_errors(cfg_file):
    cfg = load_config(cfg_file)
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(cfg, ["lora.rank"])
    with pytest.raises(ConfigError, match="did you mean 'lora.rank'"):
        apply_overrides(cfg, ["~lora.rnak"])
    with pytest.raises(ConfigError, match="'seed' is a value"):
        apply_overrides(cfg, ["seed.x=1"])


def test_load_recipe_config_argv_and_interpolation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: /runs\nlog: ${out}/log\n")
    cfg = load_recipe_config(["--config", str(path), "out=/tmp/o"])
    assert cfg.log == "/tmp/o/log"
    cfg = load_recipe_config([f"--config={path}"])
    assert cfg.log == "/runs/log"
    with pytest.raises(ConfigError, match="missing --config"):
        load_recipe_config(["a=1"])
    with pytest.raises(ConfigError, match="unknown option '--bogus'"):
        load_recipe_config(["--config", str(path), "--bogus"])


# ---------------------------------------------------------------------------- typed parsing


def test_parse_good_config(cfg_file):
    s = parse_recipe_args(["--config", str(cfg_file), "seed=3", "lora.alpha=8"], Settings)
    assert isinstance(s, Settings) and isinstance(s.lora, LoRAConfig)
    assert s.seed == 3 and s.lora.alpha == 8.0 and isinstance(s.lora.alpha, float)
    assert s.lora.dropout == 0.0  # default of an optional field
    assert s.lr_scheduler.schedule == "cosine" and s.tokenizer is None
    assert s.optimizer == {"_component_": "torch.optim.AdamW", "lr": 2e-4, "weight_decay": 0.0}


def test_unknown_key_suggests(cfg_file):
    cfg = apply_overrides(load_config(cfg_file), ["lora.rnak=4"])
    errors = _errors(cfg)
    assert "unknown config key 'lora.rnak' — did you mean 'lora.rank'?" in errors
    cfg = apply_overrides(load_config(cfg_file), ["seeed=1"])
    assert "unknown config key 'seeed' — did you mean 'seed'?" in _errors(cfg)


def test_missing_and_wrong_types_all_reported(cfg_file):
    cfg = apply_overrides(
        load_config(cfg_file),
        ["~seed", "packing=1", "max_steps=ten", "dtype=bf61", "lora.targets=q_proj", "quantize=nf5"],
    )
    errors = _errors(cfg)
    text = "\n".join(errors)
    assert len(errors) == 6, text
    assert "missing config key 'seed'" in text
    assert "config key 'packing' = 1: expected bool" in text
    assert "config key 'max_steps' = 'ten': expected int | null" in text
    assert "'dtype' = 'bf61'" in text and "did you mean 'bf16'" in text
    assert "config key 'lora.targets' = 'q_proj': expected list of str (write a list as [a,b])" in text
    assert "'quantize' = 'nf5'" in text


def test_coercions(cfg_file):
    cfg = apply_overrides(
        load_config(cfg_file),
        ["lora.alpha=16", "lora.dropout='1e-1'", "seed=2.0", "checkpoint_dir=123"],
    )
    s = parse_config(cfg, Settings)
    assert s.lora.alpha == 16.0 and isinstance(s.lora.alpha, float)  # int -> float
    assert s.lora.dropout == pytest.approx(0.1)  # "1e-1" string -> float
    assert s.seed == 2 and isinstance(s.seed, int)  # integral float -> int
    assert s.checkpoint_dir == "123"  # number -> str
    bad = apply_overrides(load_config(cfg_file), ["seed=2.5", "checkpoint_dir=null", "packing=maybe"])
    text = "\n".join(_errors(bad))
    assert "'seed' = 2.5: expected int" in text
    assert "'checkpoint_dir' = None: expected str" in text
    assert "'packing' = 'maybe': expected bool" in text


def test_component_errors(cfg_file):
    cfg = apply_overrides(load_config(cfg_file), ["optimizer.lrr=1e-3"])
    assert _errors(cfg) == [
        "unknown config key 'optimizer.lrr' for torch.optim.AdamW — did you mean 'optimizer.lr'?"
    ]
    cfg = apply_overrides(load_config(cfg_file), ["optimizer._component_=torch.optim.AdamX"])
    (err,) = _errors(cfg)
    assert "optimizer._component_" in err and "torch.optim.AdamX" in err and "did you mean" in err
    cfg = apply_overrides(load_config(cfg_file), ["optimizer._component_=nosuchpkg.Opt",
                                                  "allowed_components=[nosuchpkg.*]"])
    (err,) = _errors(cfg)
    assert "cannot import 'nosuchpkg.Opt'" in err
    # provided args: the recipe passes tokenizer/max_seq_len itself
    cfg = apply_overrides(load_config(cfg_file), ["dataset.max_seq_len=5", "~dataset.source"])
    text = "\n".join(_errors(cfg))
    assert "'dataset.max_seq_len' is passed by the recipe itself" in text
    assert "missing config key 'dataset.source'" in text
    # a component field without _component_
    cfg = apply_overrides(load_config(cfg_file), ["~optimizer._component_"])
    assert "needs a '_component_' entry" in _errors(cfg)[0]


def test_check_component_direct():
    check_component({"_component_": "torch.optim.SGD", "lr": 0.1}, "optimizer", provided=("params",))
    with pytest.raises(ConfigErrors, match="missing config key 'optimizer.lr'|params"):
        check_component({"_component_": "torch.optim.SGD"}, "optimizer", provided=())
    with pytest.raises(ConfigErrors, match="did you mean 'optimizer.momentum'"):
        check_component({"_component_": "torch.optim.SGD", "momentun": 0.9}, "optimizer", None)
    # **kwargs targets accept anything
    check_component({"_component_": "builtins.dict", "anything": 1}, "x", None, allowed=["builtins.dict"])


def test_component_values_of_the_wrong_kind(cfg_file):
    # judged by the target's defaults, before anything is built (AdamW would raise a TypeError
    # from inside torch on lr='abc')
    cfg = apply_overrides(load_config(cfg_file), ["optimizer.lr=abc", "optimizer.amsgrad=1",
                                                  "optimizer.betas=0.9"])
    assert sorted(_errors(cfg)) == [
        "config key 'optimizer.amsgrad' = 1: torch.optim.AdamW expects true or false (default False)",
        "config key 'optimizer.betas' = 0.9: torch.optim.AdamW expects a list (default [0.9, 0.999])",
        "config key 'optimizer.lr' = 'abc': torch.optim.AdamW expects a number (default 0.001)",
    ]
    # right kinds pass: an int for a float, a list for a tuple, None for anything
    check_component({"_component_": "torch.optim.AdamW", "lr": 1, "betas": [0.8, 0.9],
                     "foreach": None, "weight_decay": None}, "optimizer", None)
    with pytest.raises(ConfigErrors, match=r"'data.split' = 3: .* expects a string \(default 'train'\)"):
        check_component({"_component_": "tunelab.training.config._example_dataset", "split": 3}, "data", None)


# ---------------------------------------------------------------------------- instantiate


def test_instantiate_optimizer_and_dataset():
    p = torch.nn.Parameter(torch.randn(3))
    opt = instantiate({"_component_": "torch.optim.AdamW", "lr": 1e-3}, [p])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3
    node = OmegaConf.create({"_component_": "tunelab.training.config._example_dataset", "source": "s"})
    out = instantiate(node, "TOK", max_seq_len=7)
    assert out == dict(tokenizer="TOK", source="s", max_seq_len=7, split="train")
    assert instantiate(None) is None
    with pytest.raises(ConfigError, match="passes itself"):
        instantiate({"_component_": "tunelab.training.config._example_dataset", "source": "s",
                     "max_seq_len": 3}, "TOK", max_seq_len=7)
    with pytest.raises(ConfigError, match="_component_"):
        instantiate({"lr": 1})


def test_instantiate_turns_a_library_refusal_into_one_line(monkeypatch, tmp_path):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ConfigError, match=r"^torch.optim.AdamW\(lr=-1, weight_decay=0.1\) refused its "
                                          r"config values: Invalid learning rate: -1; fix them"):
        instantiate({"_component_": "torch.optim.AdamW", "lr": -1, "weight_decay": 0.1}, params)

    # the same exception from tunelab's own code (this file is inside the package) is a bug
    def buggy(x: int = 1):
        raise ValueError("a bug, not a config problem")

    import tunelab.training.config as config_module

    buggy.__module__ = "tunelab.training.config"  # as if defined there (the allowlist's judge)
    monkeypatch.setattr(config_module, "_buggy", buggy, raising=False)
    with pytest.raises(ValueError, match="a bug"):
        instantiate({"_component_": "tunelab.training.config._buggy", "x": 2})
    # ... and so is one from the user's own (not installed) component
    (tmp_path / "my_component.py").write_text("def build(x=1):\n    raise TypeError('my bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="my bug"):
        instantiate({"_component_": "my_component.build", "x": 2}, allowed_components=["my_component.*"])
    # a call that does not fit the signature is a config error whoever the target is
    with pytest.raises(ConfigError, match=r"my_component.build\(y=2\) refused .*unexpected keyword"):
        instantiate({"_component_": "my_component.build", "y": 2}, allowed_components=["my_component.*"])


def test_instantiate_nested_component():
    node = {"_component_": "builtins.dict", "inner": {"_component_": "builtins.list"}, "x": 1}
    assert instantiate(node, allowed_components=["builtins.*"]) == {"inner": [], "x": 1}


# ---------------------------------------------------------------------------- saving + entry


def test_save_config_roundtrip(cfg_file, tmp_path):
    s = parse_recipe_args(["--config", str(cfg_file)], Settings)
    out = save_config(s, tmp_path / "out" / "config.yaml")
    again = parse_recipe_args(["--config", str(out)], Settings)
    assert again == s
    assert config_to_dict(s)["lora"]["dropout"] == 0.0


def test_recipe_entry(capsys, monkeypatch):
    def bad(argv):
        raise ConfigErrors(["first problem", "second problem"])

    with pytest.raises(SystemExit) as info:
        recipe_entry(bad, [])
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines() == ["error: first problem", "error: second problem"]

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        recipe_entry(interrupted, [])
    assert info.value.code == 130

    seen = []
    monkeypatch.setattr(sys, "argv", ["prog", "--config", "x"])
    recipe_entry(lambda argv: seen.append(argv))  # returns normally on success
    assert seen == [["--config", "x"]]

    with pytest.raises(RuntimeError):  # bugs keep their traceback
        recipe_entry(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")), [])


@dataclass(kw_only=True)
class _TextGroup:
    template: str
    size: int


@dataclass(kw_only=True)
class _TextSettings:
    prompt: str | None
    name: str
    steps: int
    group: _TextGroup


@pytest.mark.parametrize("raw,expected", [
    ("a: b", "a: b"),          # YAML would make a mapping
    ("yes", "yes"),            # YAML 1.1 would make a bool
    ("x # y", "x # y"),        # YAML would cut a comment
    ("[1, 2]", "[1, 2]"),      # a list
    ("1:30", "1:30"),          # base-60 90
    ("null", None),            # an optional string field still takes null
])
def test_string_fields_take_the_command_line_text_literally(tmp_path, raw, expected):
    path = tmp_path / "c.yaml"
    path.write_text("prompt: hi\nname: n\nsteps: 1\ngroup: {template: t, size: 2}\n")
    cfg = parse_recipe_args(["--config", str(path), f"prompt={raw}", f"group.template={raw}",
                             "steps=3", "group.size=4"], _TextSettings)
    assert cfg.prompt == expected
    assert cfg.group.template == raw  # a plain str field: even "null" is text
    assert (cfg.steps, cfg.group.size) == (3, 4)  # typed fields keep YAML typing
    assert parse_recipe_args(["--config", str(path), "name=null"], _TextSettings).name == "null"


def test_components_resolve_only_to_the_allowlist(cfg_file, tmp_path, monkeypatch):
    """tunelab.*, torch.optim.*, torch.nn.* and what the config lists under allowed_components:
    judged on the string before any import, on every attribute walked (never through a module)
    and on the object found (its own module)."""
    (tmp_path / "noisy_mod.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef build(x=1):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refused = {
        "os.system": "not an allowed component",
        "noisy_mod.build": "not an allowed component",
        "tunelab.training.checkpointing.os.system": "not an allowed component",  # through a module
        "tunelab.training.checkpointing.save_file": "it is safetensors.torch.save_file",  # re-exported
    }
    for target, words in refused.items():
        cfg = apply_overrides(load_config(cfg_file), [f"optimizer._component_={target}"])
        (err,) = _errors(cfg)
        assert words in err and "allowed_components" in err, err
        with pytest.raises(ConfigError, match="not an allowed component"):
            instantiate({"_component_": target})
    assert not (tmp_path / "imported").exists()  # a refused module is never imported
    # listed in the config (file or command line): allowed, by name or module.*
    for entry in ("noisy_mod.build", "noisy_mod.*"):
        node = {"_component_": "noisy_mod.build", "x": 3}
        assert instantiate(node, allowed_components=[entry]) == 3
    path = tmp_path / "listed.yaml"
    path.write_text(YAML.replace("torch.optim.AdamW, lr: 2.0e-4, weight_decay: 0.0", "noisy_mod.build, x: 2")
                    + "allowed_components: [noisy_mod.build]\n")
    assert parse_config(load_config(path), Settings).optimizer["x"] == 2


def test_yaml_surprises_are_text_or_errors(tmp_path):
    """No base-60 integers (``1:30`` was 90 in YAML 1.1), in overrides and files alike, and a
    duplicate key in a file is an error instead of the last one silently winning."""
    assert parse_value("1:30") == "1:30" and parse_value("12") == 12 and parse_value("1e-4") == 1e-4
    path = tmp_path / "c.yaml"
    path.write_text("a: 1:30\nb: 0x10\n")
    assert dict(load_config(path)) == {"a": "1:30", "b": 16}
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'a'") as info:
        load_config(path)
    assert "\n" not in str(info.value)
