"""Typed parsing of a loaded config: a DictConfig (or mapping) -> a recipe's dataclass.

Supported field types: ``int``, ``float`` (an int or a string such as
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
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import TunelabError
from tunelab.training.components import COMPONENT_KEY, ConfigErrors, _component_errors, _did_you_mean, _plain, _show

__all__ = ["ALLOWED_KEY", "component_field", "config_to_dict", "error_lines", "parse_config", "save_config"]

T = TypeVar("T")
ALLOWED_KEY = "allowed_components"  # the config's own additions to the component allowlist
# the allowlist of the config being parsed, for the component checks deep inside the parse
_allowed_components: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("allowed", default=())


def error_lines(exc: BaseException) -> list[str]:
    """The one-line messages of an error (several for ``ConfigErrors``)."""
    if isinstance(exc, ConfigErrors):
        return list(exc.errors)
    return [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]


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
