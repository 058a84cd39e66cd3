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

Schema typing rules. Supported field types: ``int``, ``float`` (an int or a string such as
``"1e-4"`` is accepted), ``bool`` (only true/false), ``str`` (numbers are turned into strings),
``pathlib.Path``, ``Literal[...]``, ``X | None`` / ``Optional[X]`` (None only there),
``list[X]`` / ``tuple[X, ...]``, nested dataclasses (groups like ``lora``), ``dict`` (plain
mappings or ``_component_`` nodes; keys under a component node are the target's keyword
arguments) and ``Any``. Fields without a default are required in the YAML. A component field
may say which arguments the recipe passes itself, so that missing required arguments are
reported before any work starts::

    dataset: dict = component_field(provided=("tokenizer", "max_seq_len"))
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import ConfigError, TunelabError, path_error
from tunelab.training.components import (
    COMPONENT_KEY,
    ConfigErrors,
    _component_errors,
    _did_you_mean,
    _plain,
    _show,
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

T = TypeVar("T")
ALLOWED_KEY = "allowed_components"  # the config's own additions to the component allowlist
# the allowlist of the config being parsed, for the component checks deep inside the parse
_allowed_components: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("allowed", default=())


def error_lines(exc: BaseException) -> list[str]:
    """The one-line messages of an error (several for ``ConfigErrors``)."""
    if isinstance(exc, ConfigErrors):
        return list(exc.errors)
    return [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]


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
# Typed parsing
# --------------------------------------------------------------------------------------------


def component_field(
    *, provided: Sequence[str] = (), default: Any = dataclasses.MISSING
) -> Any:
    """A dataclass field holding a ``_component_`` node.

    Args:
        provided: arguments the recipe passes itself (e.g. ``("tokenizer", "max_seq_len")``
            or ``("params",)``); validation then reports required arguments that are neither
            in the node nor provided, and rejects provided ones set in the node.
        default: optional default (e.g. ``None`` for an optional component).
    """
    return dataclasses.field(default=default, metadata={"component": True, "provided": tuple(provided)})


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, Sequence) and args:
        return f"list of {_type_name(args[0])}"
    if origin in (dict, Mapping):
        return "mapping"
    return str(tp).replace("typing.", "")


class _Fail(Exception):
    """Internal: a value does not fit a type (message is the 'expected ...' part)."""


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Convert ``value`` to ``tp`` or raise _Fail; nested structures report into ``errors``."""
    if tp is Any or tp is object:
        return _plain(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Fail
        options = [a for a in args if a is not type(None)]
        for opt in options:
            sub_errors: list[str] = []
            try:
                out = _coerce(value, opt, key, sub_errors)
            except _Fail:
                continue
            errors.extend(sub_errors)
            return out
        raise _Fail
    if value is None:
        if tp is type(None):
            return None
        raise _Fail
    if origin is Literal:
        for choice in args:  # exact type match: `true` must not pass for Literal[1]
            if type(choice) is type(value) and choice == value:
                return value
        raise _Fail
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, (Mapping, DictConfig)):
            raise _Fail
        return _parse_dataclass(value, tp, key, errors)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            raise _Fail
        elem = args[0] if args else Any
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, elem, f"{key}[{i}]", errors))
            except _Fail:
                errors.append(f"config key '{key}[{i}]' = {_show(v)}: expected {_type_name(elem)}")
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, (Mapping, DictConfig)):
            raise _Fail
        return _plain(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Fail from None
        raise _Fail
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Fail
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise _Fail
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Fail
    return _plain(value)  # an annotation we do not understand: pass through unchecked


def _schema_hints(schema: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(schema)
    except Exception:  # unresolvable forward reference: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(schema)}


def _parse_dataclass(data: Any, schema: type, prefix: str, errors: list[str]) -> Any:
    hints = _schema_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    keys = [str(k) for k in data]
    kwargs: dict[str, Any] = {}
    for k in keys:
        if k not in fields:
            full = f"{prefix}.{k}" if prefix else k
            choices = [f"{prefix}.{n}" if prefix else n for n in fields]
            hint = _did_you_mean(full, choices)
            if not hint:
                shown = ", ".join(fields) if len(fields) <= 12 else ", ".join(list(fields)[:12]) + ", ..."
                hint = f" (known keys{' under ' + repr(prefix) if prefix else ''}: {shown})"
            errors.append(f"unknown config key '{full}'{hint}")
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name not in keys:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(
                    f"missing config key '{full}' (expected {_type_name(hints.get(name, Any))}); "
                    f"add it to the YAML or pass {full}=VALUE"
                )
            continue
        try:
            raw = data[name]
        except OmegaConfBaseException as e:
            errors.append(f"config key '{full}': {' '.join(str(e).split())}")
            continue
        tp = hints.get(name, Any)
        try:
            value = _coerce(raw, tp, full, errors)
        except _Fail:
            errors.append(
                f"config key '{full}' = {_show(raw)}: expected {_type_name(tp)}"
                + _literal_hint(raw, tp)
            )
            continue
        if isinstance(value, dict):
            is_component = COMPONENT_KEY in value
            if f.metadata.get("component") and not is_component:
                errors.append(
                    f"config key '{full}' needs a '{COMPONENT_KEY}' entry naming what to build"
                )
            elif is_component:
                provided = f.metadata.get("provided") if f.metadata.get("component") else None
                errors.extend(_component_errors(value, full, provided, _allowed_components.get()))
        kwargs[name] = value
    if any(n not in kwargs for n, f in fields.items() if _required(f)):
        return None  # cannot build the instance; errors already say why
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks of the recipe
        if isinstance(e, TunelabError):
            errors.extend(error_lines(e))
        else:
            errors.append(f"config {'group ' + repr(prefix) if prefix else ''}: {e}".strip())
        return None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _literal_hint(value: Any, tp: Any) -> str:
    """A did-you-mean among Literal choices, or how to write a list."""
    choices: list[str] = []
    is_list = False
    stack = [tp]
    while stack:
        t = stack.pop()
        origin = typing.get_origin(t)
        if origin is Literal:
            choices += [str(a) for a in typing.get_args(t)]
        elif origin in (Union, types.UnionType):
            stack += list(typing.get_args(t))
        elif origin in (list, tuple, Sequence) or t in (list, tuple):
            is_list = True
    if choices and isinstance(value, str):
        return _did_you_mean(value, choices)
    if is_list and isinstance(value, str):
        return " (write a list as [a,b])"
    return ""


def parse_config(cfg: DictConfig | Mapping[str, Any], schema: type[T]) -> T:
    """Validate a config against a recipe's settings dataclass and build it.

    Args:
        cfg: the loaded (and overridden) config.
        schema: a dataclass; nested dataclass fields are groups.

    Returns:
        An instance of ``schema``.

    Raises:
        ConfigErrors: all unknown keys (with a did-you-mean), missing required keys, values
            of the wrong type and bad ``_component_`` nodes, one line each.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass, got {schema!r}")
    errors: list[str] = []
    if isinstance(cfg, DictConfig):
        try:
            data: Any = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigErrors([f"cannot resolve config: {' '.join(str(e).split())}"]) from None
    else:
        data = dict(cfg)
    # the config's own allowlist additions, for the component checks; a key of every config,
    # kept only where the schema has the field (the recipes', which instantiate at run time)
    fields = {f.name for f in dataclasses.fields(schema)}
    allowed = data.get(ALLOWED_KEY) if ALLOWED_KEY in fields else data.pop(ALLOWED_KEY, None)
    allowed = tuple(a for a in allowed if isinstance(a, str)) if isinstance(allowed, list) else ()
    token = _allowed_components.set(allowed)
    try:
        result = _parse_dataclass(data, schema, "", errors)
    finally:
        _allowed_components.reset(token)
    if errors:
        raise ConfigErrors(errors)
    return result


def config_to_dict(instance: Any) -> dict[str, Any]:
    """A parsed settings instance as plain data (nested dicts/lists), for saving."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(dataclasses.asdict(instance))


def save_config(instance: Any, path: str | Path) -> Path:
    """Write the resolved settings (defaults filled in) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(instance), sort_keys=False))
    return path


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
