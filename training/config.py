"""Configs that refuse typos: YAML + command-line overrides -> a typed dataclass.

A recipe declares its settings as ``@dataclass(kw_only=True)`` classes and calls::

    cfg = parse_recipe_args(argv, RecipeConfig)   # argv = ["--config", X, "key.sub=v", "~key"]
    save_config(cfg, output_dir / "config.yaml")  # the resolved config, defaults filled in
    optimizer = instantiate(cfg.optimizer, model.parameters())
    dataset = instantiate(cfg.dataset, tokenizer=tok, max_seq_len=cfg.max_seq_len)

The pieces, usable on their own:

* ``load_config(name_or_path) -> DictConfig``: a built-in name (``tiny/lora``, resolved to
  ``tunelab/configs/tiny/lora.yaml``) or a path to a YAML file.
* ``apply_overrides(cfg, ["lora.rank=8", "~validation"]) -> DictConfig``: values are typed
  by YAML (``1e-4`` is a float, ``[q_proj,v_proj]`` a list, ``null`` None); ``~key`` removes.
* ``load_recipe_config(argv) -> DictConfig``: ``--config`` + overrides, interpolations resolved.
* ``parse_config(cfg, schema) -> schema instance``: every key must be a field (a typo gets a
  did-you-mean), every required field present, every value of the declared type, and every
  ``_component_`` node must name an importable target that accepts the node's keys. All
  problems are collected and raised together as one ``ConfigErrors`` (one line each).
* ``instantiate(node, *args, **kwargs)`` / ``check_component(node, key_path, provided)``
  (``tunelab.training.components``, re-exported here).
* ``recipe_entry(main)``: runs ``main(sys.argv[1:])``; a ``TunelabError`` becomes
  ``error: <message>`` on stderr and exit code 1, Ctrl-C exit code 130.

Typed parsing (the schema rules) lives in ``tunelab.training.schema``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import ConfigError, TunelabError, path_error
from tunelab.training.schema import (
    T,
    _schema_hints,
    component_field,
    config_to_dict,
    error_lines,
    parse_config,
    save_config,
)
from tunelab.training.components import (
    COMPONENT_KEY,
    ConfigErrors,
    _did_you_mean,
    check_component,
    instantiate,
)

__all__ = [
    "COMPONENT_KEY",
    "ConfigErrors",
    "apply_overrides",
    "builtin_config_names",
    "check_component",
    "component_field",
    "config_to_dict",
    "configs_dir",
    "error_lines",
    "instantiate",
    "load_config",
    "load_recipe_config",
    "parse_config",
    "parse_recipe_args",
    "parse_value",
    "recipe_entry",
    "resolve_config_path",
    "save_config",
]

# --------------------------------------------------------------------------------------------
# Loading YAML and applying overrides
# --------------------------------------------------------------------------------------------


def configs_dir() -> Path:
    """Folder of the built-in configs (``tunelab/configs``, shipped as package data)."""
    import tunelab.configs

    return Path(tunelab.configs.__file__).resolve().parent


def builtin_config_names() -> list[str]:
    """All built-in config names (``family/name`` without ``.yaml``), sorted."""
    root = configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Path of a config given as a YAML file path or a built-in name like ``tiny/lora``.

    Raises:
        ConfigError: neither an existing file nor a built-in name.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    name = text[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else text
    builtin = configs_dir() / f"{name}.yaml"
    if not path.is_absolute() and builtin.is_file():
        return builtin
    hint = _did_you_mean(name, builtin_config_names())
    raise ConfigError(
        f"config '{text}' not found: not a YAML file and not a built-in config name{hint} "
        "(run `tune ls` to see the built-in names)"
    )


def load_config(name_or_path: str | Path) -> DictConfig:
    """Load a config by built-in name (``llama3_1/8B_lora_single_device``) or YAML path.

    Args:
        name_or_path: built-in name (resolved under ``tunelab/configs``) or a YAML file path.

    Returns:
        The config as an OmegaConf ``DictConfig`` (interpolations not yet resolved).

    Raises:
        ConfigError: missing file, invalid YAML, or a top level that is not a mapping.
    """
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
        cfg = OmegaConf.create(data) if data is not None else None
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"config {path} is not valid YAML: {detail}") from None
    if cfg is None or not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of keys to values at the top level")
    return cfg


class _Loader(yaml.SafeLoader):
    """The YAML of config files and overrides: SafeLoader typing values like OmegaConf's loader
    (``1e-4`` / ``5e3`` are floats, plain YAML 1.1 wants ``1.0e-4``; dates stay strings), without
    YAML 1.1's base-60 integers (``1:30`` is text, not 90) and refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_INT_RE = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_REPLACED = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp")
_Loader.yaml_implicit_resolvers = {
    k: [(tag, r) for tag, r in v if tag not in _REPLACED] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789"))


def parse_value(text: str) -> Any:
    """Type an override value the way YAML would (plus ``1e-4`` as a float).

    A value that is not valid YAML on its own (e.g. ``a: b`` inside a prompt) stays a string.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], schema: type | None = None) -> DictConfig:
    """Apply ``key.sub=value`` and ``~key.sub`` overrides in order (modifies and returns cfg).

    Setting a key that does not exist yet is allowed here (a keyword argument under a
    ``_component_`` node is legitimate); typed validation (``parse_config``) rejects it when
    it is not a field. Removing a key that does not exist is an error.

    Args:
        cfg: the loaded config.
        overrides: strings like ``optimizer.lr=1e-4``, ``lora.targets=[q_proj,v_proj]``,
            ``tokenizer=null`` or ``~validation``.
        schema: the recipe's settings dataclass. Given, a value for a field typed ``str`` (or
            ``str | None``) is taken literally, not as YAML: ``prompt="a: b"`` stays that text,
            ``prompt=yes`` is not a bool, ``#`` starts no comment; ``null`` still means None
            for an optional one.

    Raises:
        ConfigError: malformed override, removal of a missing key, or a path through a
            scalar value.
    """
    for item in overrides:
        if item.startswith("~"):
            _remove_key(cfg, item[1:], item)
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith("-"):
            raise ConfigError(
                f"bad override '{item}': expected key.sub=value (set) or ~key.sub (remove)"
            )
        if key.startswith("+"):  # accept Hydra's "+new.key=value" spelling for adding keys
            key = key[1:]
        text = _text_field(schema, key) if schema is not None else None
        if text is None:
            value = parse_value(raw)
        else:  # a string field: the text as typed
            value = None if text == "optional" and raw.strip() == "null" else raw
        _set_key(cfg, key, value, item)
    return cfg


def _text_field(schema: type, key: str) -> str | None:
    """``"str"`` / ``"optional"`` when ``key`` (dotted) is a field typed ``str`` / ``str | None``
    in ``schema`` (through nested groups), None for any other field or an unknown key."""
    tp: Any = schema
    for part in key.split("."):
        group = next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None)
        if group is None or part not in (hints := _schema_hints(group)):
            return None
        tp = hints[part]
    if tp is str:
        return "str"
    return "optional" if set(typing.get_args(tp)) == {str, type(None)} else None


def _split_key(key: str, item: str) -> list[str]:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"bad override '{item}': empty part in key '{key}'")
    return parts


def _set_key(cfg: DictConfig, key: str, value: Any, item: str) -> None:
    parts = _split_key(key, item)
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if part in node else None
        if child is None:
            # Creating a group that is null/absent: e.g. validation._component_=... on
            # `validation: null`.
            node[part] = {}
            child = node[part]
        elif not isinstance(child, DictConfig):
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"bad override '{item}': '{where}' is a value ({child!r}), not a group of keys"
            )
        node = child
    try:
        node[parts[-1]] = value
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override '{item}': {' '.join(str(e).split())}") from None


def _remove_key(cfg: DictConfig, key: str, item: str) -> None:
    parts = _split_key(key, item)
    node: Any = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            parent = ".".join(parts[:i])
            choices = [f"{parent}.{k}" if parent else str(k) for k in node] if isinstance(
                node, DictConfig
            ) else []
            raise ConfigError(
                f"cannot remove '{key}': no such key in the config{_did_you_mean(key, choices)}"
            )
        if i == len(parts) - 1:
            del node[part]
        else:
            node = node[part]


def _split_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    config = None
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a value: a config name or a YAML path")
            config = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError(
                f"unknown option '{arg}': recipes take --config CONFIG then key=value overrides"
            )
        else:
            overrides.append(arg)
        i += 1
    if not config:
        raise ConfigError("missing --config: pass --config NAME_OR_PATH (see `tune ls`)")
    return config, overrides


def load_recipe_config(argv: Sequence[str], schema: type | None = None) -> DictConfig:
    """Load ``--config X`` from argv, apply the remaining overrides, resolve interpolations.

    Args:
        argv: ``["--config", NAME_OR_PATH, *overrides]`` (``--config`` may appear anywhere).
        schema: the recipe's settings dataclass (string fields' overrides taken literally).

    Returns:
        The resolved ``DictConfig`` (no ``${...}`` left).
    """
    config, overrides = _split_argv(argv)
    cfg = apply_overrides(load_config(config), overrides, schema)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve interpolation in config: {' '.join(str(e).split())}")
    return cfg


def parse_recipe_args(argv: Sequence[str], schema: type[T]) -> T:
    """Command line of a recipe -> validated settings.

    Args:
        argv: ``["--config", NAME_OR_PATH, "key.sub=value", "~key", ...]``.
        schema: the recipe's ``@dataclass(kw_only=True)`` settings class.

    Returns:
        An instance of ``schema``. ``config_to_dict(instance)`` / ``save_config(instance,
        path)`` give the resolved config (defaults filled in) for saving next to outputs.

    Raises:
        ConfigErrors: every problem found, one line each.
    """
    return parse_config(load_recipe_config(argv, schema), schema)


# --------------------------------------------------------------------------------------------
# Entry point of a recipe script
# --------------------------------------------------------------------------------------------


def recipe_entry(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Run a recipe's ``main(argv)`` with user-facing error handling.

    ``TunelabError`` (bad config, checkpoint or data) prints ``error: <message>`` per line on
    stderr and exits 1, without a traceback; Ctrl-C exits 130. A non-zero int returned by
    ``main`` becomes the exit code; otherwise this returns normally.

    Args:
        main: the recipe's ``main(argv: list[str])``.
        argv: arguments (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except (TunelabError, OSError) as e:
        if isinstance(e, OSError) and (e := path_error(e)) is None:
            raise
        for line in error_lines(e):
            print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); stopping", file=sys.stderr)
        sys.exit(130)
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)
