"""``_component_`` nodes: the swappable objects of a config (dataset, optimizer, loggers).

A node names a callable by its dotted import path and gives its keyword arguments::

    optimizer: {_component_: torch.optim.AdamW, lr: 2.0e-4, weight_decay: 0.0}

:func:`check_component` checks one without building anything (the target imports, every key is
one of its arguments, required arguments are there, values are of the kind its defaults say);
:func:`instantiate` builds it. ``tunelab.training.config`` runs the check on every component
field while parsing a config, so a bad node fails before any work starts. The small helpers the
two modules share (``ConfigErrors``, did-you-mean, plain values) live here, the lower of the two.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sysconfig
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import ConfigError

__all__ = ["ALLOWED_PREFIXES", "COMPONENT_KEY", "ConfigErrors", "check_component", "instantiate"]

COMPONENT_KEY = "_component_"


class ConfigErrors(ConfigError):
    """Several config problems found at once; ``.errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean '{match[0]}'?" if match else ""


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    value = _plain(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What a _component_ may name without being listed: tunelab's own objects and torch's
# optimizers, schedulers and layers. Anything else must be named in the config's top-level
# ``allowed_components`` (a config file or the command line; never a board request).
ALLOWED_PREFIXES = ("tunelab.", "torch.optim.", "torch.nn.")


def _allowed(name: str, allowed: Sequence[str]) -> bool:
    """``name`` (dotted) is one of tunelab's / torch's allowed ones, listed in ``allowed``, or
    under a ``module.*`` entry there."""
    return name.startswith(ALLOWED_PREFIXES) or any(
        name == entry or (entry.endswith(".*") and name.startswith(entry[:-1])) for entry in allowed)


def _import_target(target: Any, key_path: str, allowed: Sequence[str] = ()) -> Any:
    """The callable a ``_component_`` names, if the allowlist admits it.

    Checked three times: the dotted string before anything is imported (so a request cannot
    make tunelab import an arbitrary module), every attribute on the way (never through a
    module: ``tunelab.x.os.system`` is ``os.system``), and the object found, by its own
    ``__module__`` and ``__qualname__`` (a re-exported ``os.system`` is still ``os.system``).

    Raises:
        ConfigError: not a dotted path, not allowed, not importable, or not callable.
    """
    where = f"{key_path}.{COMPONENT_KEY}" if key_path else COMPONENT_KEY
    if not isinstance(target, str) or not target or "." not in target:
        raise ConfigError(
            f"'{where}' = {target!r} must be a dotted import path like torch.optim.AdamW"
        )
    refusal = (f"'{where}' = '{target}' is not an allowed component: a config may name tunelab.*, "
               "torch.optim.* and torch.nn.* objects, and others it lists under a top-level "
               "allowed_components: [...]")
    if not _allowed(target, allowed):
        raise ConfigError(refusal)
    parts = target.split(".")
    module = None
    split = len(parts)
    # Longest importable module prefix, then attributes (handles pkg.mod.Class.method).
    for split in range(len(parts) - 1, 0, -1):
        mod_name = ".".join(parts[:split])
        try:
            module = importlib.import_module(mod_name)
            break
        except ModuleNotFoundError as e:
            if e.name and not (mod_name == e.name or mod_name.startswith(e.name + ".")):
                # The module exists but one of ITS imports is missing: a real problem to show.
                raise ConfigError(
                    f"cannot import '{target}' for '{where}': {e} (install the missing package)"
                ) from None
            continue
    if module is None:
        raise ConfigError(f"cannot import '{target}' for '{where}': no module '{parts[0]}'")
    obj: Any = module
    for i, attr in enumerate(parts[split:], start=split):
        if not hasattr(obj, attr):
            owner = ".".join(parts[:i])
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"cannot import '{target}' for '{where}': '{owner}' has no '{attr}'"
                + _did_you_mean(attr, names)
            )
        obj = getattr(obj, attr)
        if isinstance(obj, types.ModuleType):  # a module imported by another is not its part
            raise ConfigError(refusal)
    if not callable(obj):
        raise ConfigError(f"'{where}' = '{target}' is not callable")
    real = f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', '')}"
    if not _allowed(real, allowed):
        raise ConfigError(f"{refusal} (it is {real})")
    return obj


def _wrong_kind(value: Any, default: Any) -> str | None:
    """What a component argument expects, when ``value`` is plainly not that, else None.

    Judged by the argument's default, the one type hint every target has (annotations are
    often missing or unions like torch's ``lr: float | Tensor``): a number for a numeric
    default, true/false for a boolean one, a string for a string one, a list for a tuple one.
    None is always let through (many arguments take it), so is anything without a default.
    """
    if value is None or default is None or default is inspect.Parameter.empty:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"true or false (default {default})"
    if isinstance(default, (int, float)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number else f"a number (default {default})"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"a string (default {default!r})"
    if isinstance(default, tuple):
        return None if isinstance(value, (list, tuple, ListConfig)) else f"a list (default {list(default)})"
    return None


def _component_errors(
    node: Mapping[str, Any], key_path: str, provided: Sequence[str] | None, allowed: Sequence[str] = ()
) -> list[str]:
    errors: list[str] = []
    try:
        target = _import_target(node.get(COMPONENT_KEY), key_path, allowed)
    except ConfigError as e:
        return [str(e)]
    name = node[COMPONENT_KEY]
    keys = [k for k in node if k != COMPONENT_KEY]
    for k in keys:  # nested component nodes are checked too
        v = node[k]
        if isinstance(v, Mapping) and COMPONENT_KEY in v:
            errors.extend(_component_errors(v, f"{key_path}.{k}", None, allowed))
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: cannot check further
        return errors
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [
        n
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    provided_set = set(provided or ())
    for k in keys:
        if k in provided_set:
            errors.append(
                f"config key '{key_path}.{k}' is passed by the recipe itself; remove it"
            )
        elif k not in params and not takes_kwargs:
            choices = [f"{key_path}.{n}" for n in named if n not in provided_set]
            hint = _did_you_mean(f"{key_path}.{k}", choices)
            if not hint:
                hint = f" (accepted: {', '.join(n for n in named if n not in provided_set)})"
            errors.append(f"unknown config key '{key_path}.{k}' for {name}{hint}")
        elif k in params and params[k].kind is inspect.Parameter.POSITIONAL_ONLY:
            errors.append(
                f"config key '{key_path}.{k}': {name} takes '{k}' only by position"
            )
        elif k in params:
            wrong = _wrong_kind(node[k], params[k].default)
            if wrong:
                errors.append(f"config key '{key_path}.{k}' = {_show(node[k])}: {name} expects {wrong}")
    if provided is not None:
        for n, p in params.items():
            if (
                p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                and n not in node
                and n not in provided_set
            ):
                errors.append(
                    f"missing config key '{key_path}.{n}' (required by {name}); "
                    f"pass {key_path}.{n}=VALUE"
                )
    return errors


def check_component(
    node: Mapping[str, Any] | DictConfig,
    key_path: str,
    provided: Sequence[str] | None = (),
    allowed: Sequence[str] = (),
) -> None:
    """Check a ``_component_`` node without building anything.

    Args:
        node: mapping with ``_component_`` (dotted import path) and keyword arguments.
        key_path: where the node lives in the config (``optimizer``), for messages.
        provided: arguments the recipe passes itself (e.g. ``("params",)``). Required
            arguments of the target must be in the node or in ``provided``; pass ``None``
            to skip that check (only unknown keys and the import are checked).
        allowed: the config's ``allowed_components`` (beyond tunelab.*, torch.optim.*,
            torch.nn.*).

    Raises:
        ConfigErrors: target not allowed or not importable, unknown keyword (with did-you-mean), a key the
            recipe provides itself, or a missing required argument.
    """
    node = _plain(node)
    if not isinstance(node, Mapping) or COMPONENT_KEY not in node:
        raise ConfigErrors([f"config key '{key_path}' needs a '{COMPONENT_KEY}' entry"])
    errors = _component_errors(node, key_path, provided, allowed)
    if errors:
        raise ConfigErrors(errors)


def instantiate(node: Mapping[str, Any] | DictConfig | None, *args: Any, allowed_components: Sequence[str] = (),
                **extra_kwargs: Any) -> Any:
    """Build the object a ``_component_`` node describes.

    ``{"_component_": "torch.optim.AdamW", "lr": 2e-4}`` with ``instantiate(node, params)``
    calls ``torch.optim.AdamW(params, lr=2e-4)``. Nested nodes with ``_component_`` are built
    first. ``extra_kwargs`` are added to (and may not repeat) the node's keys.

    Args:
        node: the component node (None returns None, for optional components).
        *args: positional arguments (e.g. model parameters for an optimizer).
        allowed_components: the config's ``allowed_components`` (beyond tunelab.*,
            torch.optim.*, torch.nn.*).
        **extra_kwargs: arguments the recipe provides (tokenizer, max_seq_len, ...).

    Returns:
        Whatever the target returns.

    Raises:
        ConfigError: no ``_component_``, target not allowed or not importable, a key given twice, or a
            library target raising TypeError/ValueError on the values (one line naming them).
    """
    if node is None:
        return None
    node = _plain(node)
    if not isinstance(node, Mapping) or COMPONENT_KEY not in node:
        raise ConfigError(f"cannot instantiate {_show(node)}: it has no '{COMPONENT_KEY}' entry")
    target = _import_target(node[COMPONENT_KEY], "", allowed_components)
    kwargs = {}
    for k, v in node.items():
        if k == COMPONENT_KEY:
            continue
        nested = isinstance(v, Mapping) and COMPONENT_KEY in v
        kwargs[k] = instantiate(v, allowed_components=allowed_components) if nested else v
    dup = sorted(set(kwargs) & set(extra_kwargs))
    if dup:
        raise ConfigError(
            f"config for {node[COMPONENT_KEY]} sets {', '.join(dup)}, which the recipe passes "
            "itself; remove it from the config"
        )
    try:
        return target(*args, **kwargs, **extra_kwargs)
    except (TypeError, ValueError, IndexError, KeyError) as e:
        # An installed library refusing a value (torch's "Invalid learning rate: -1"), or choking on
        # one (AdamW(betas=[]) indexes it), is a config error. The same exception from tunelab's
        # code, or the user's own, is more likely a bug whose traceback matters: let it through.
        if not _refused_by_library(e):
            raise
        shown = ", ".join(f"{k}={_show(v)}" for k, v in kwargs.items())
        raise ConfigError(
            f"{node[COMPONENT_KEY]}({shown}) refused its config values: {e}; fix them in the config"
        ) from e


def _refused_by_library(error: BaseException) -> bool:
    """Whether every frame between the ``instantiate`` call and the raise is an installed
    library's or the standard library's (not tunelab's). A call that does not fit the target's
    signature fails in ``instantiate`` itself, with no frame after it: that counts too."""
    package = Path(__file__).resolve().parents[1]
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    tb = error.__traceback__.tb_next if error.__traceback__ else None  # skip instantiate's frame
    while tb is not None:
        file = Path(tb.tb_frame.f_code.co_filename).resolve()
        # below tunelab's own folder only a venv kept inside a checkout (.venv/) is installed code
        parts = file.relative_to(package).parts if file.is_relative_to(package) else file.parts
        installed = "site-packages" in parts or "dist-packages" in parts  # any env layout
        if not (installed or file.is_relative_to(stdlib)):
            return False
        tb = tb.tb_next
    return True
