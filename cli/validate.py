"""`tune validate CONFIG [overrides] [--recipe RECIPE]`: check a config as the run would, without training.

Checks, collecting every problem: the YAML loads and the overrides apply; the recipe's
settings dataclass accepts it (unknown keys with did-you-mean, missing keys, types); every
``_component_`` is allowed, imports and accepts its keys; the recipe's own value checks pass
and its optimizer builds (on a stand-in parameter); and files named by the known path keys exist
(``checkpoint_dir``, ``tokenizer``, ``adapter_dir``, and ``dataset.source`` /
``validation.source`` unless they are hub dataset ids like ``org/name``). Paths starting with
``builtin:`` are assets shipped with tunelab and are not checked. Prints ``config OK`` or one ``error:`` line
per problem (exit code 1).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tunelab.errors import ConfigError, TunelabError

__all__ = ["add_parser", "check_paths", "cmd_validate", "validate_config"]

BUILTIN_PREFIX = "builtin:"
# key -> what must exist there ("dir" or "path")
PATH_KEYS = {"checkpoint_dir": "dir", "tokenizer": "path", "adapter_dir": "dir"}
DATASET_KEYS = ("dataset", "validation")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a config (keys, types, components, paths) without running",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="key=value", help="overrides, as for tune run"
    )
    p.add_argument("--recipe", help="recipe name or .py path (default: the config's recipe)")
    p.set_defaults(func=cmd_validate)


# Same rule as tunelab.data's sources: "org/name" (not ending in a data suffix) is a hub id
# when no such local path exists.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.lower().endswith(_DATA_SUFFIXES)


def check_paths(data: dict[str, Any]) -> list[str]:
    """Errors for path keys in a plain config dict that name missing files."""
    errors = []
    for key, kind in PATH_KEYS.items():
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a string field takes a number as its text (${seed} -> "0"), as the run does
        if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
            continue
        path = Path(value).expanduser()
        if kind == "dir" and not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            fix = (
                "download one with `tune download REPO_ID --output-dir DIR` and pass "
                f"{key}=DIR" if key == "checkpoint_dir" else f"pass {key}=DIR"
            )
            errors.append(f"{key} '{value}' {what}; {fix}")
        elif kind == "path" and not path.exists():
            errors.append(
                f"{key} '{value}' does not exist; pass {key}=PATH or {key}=null "
                "(null = found in checkpoint_dir)"
            )
    for key in DATASET_KEYS:
        node = data.get(key)
        if not isinstance(node, dict):
            continue
        if "source" not in node:
            continue
        source = node["source"]
        if not isinstance(source, str):
            errors.append(f"{key}.source = {source!r} is not a path or a hub dataset id; pass {key}.source=PATH")
            continue
        if source.startswith(BUILTIN_PREFIX):
            continue
        if not _looks_like_repo_id(source) and not Path(source).expanduser().exists():
            errors.append(
                f"{key}.source '{source}' does not exist; pass {key}.source=PATH to a local "
                ".json/.jsonl/.parquet file or folder, or a hub dataset id like org/name"
            )
    return errors


def _guess_recipe(config_arg: str, config_path: Path) -> str | None:
    """Recipe for a config: the registry for built-in names, else a `tune run NAME` mention."""
    from tunelab.recipes.registry import RECIPES, find_recipe_for_config
    from tunelab.training.config import configs_dir

    spec = find_recipe_for_config(config_arg)
    if spec is None:
        try:  # a path into the built-in configs folder
            rel = config_path.resolve().relative_to(configs_dir())
            spec = find_recipe_for_config(rel.with_suffix("").as_posix())
        except ValueError:
            pass
    if spec is not None:
        return spec.name
    # Copied configs usually keep their header comment "tune run <recipe> --config ...".
    text = config_path.read_text(errors="replace")
    found = {m for m in re.findall(r"tune run (?:-\S+ \S+ )*(\S+)", text) if m in RECIPES}
    return found.pop() if len(found) == 1 else None


def run_checks(cfg) -> None:
    """What a recipe checks on its parsed config before any work, the same calls: the shared
    value ranges, the DPO loss settings, and the optimizer built as the run builds it (on one
    stand-in parameter), so a config validate passes does not fail the run on configuration.

    Raises:
        TunelabError: the first problem, as the run would raise it.
    """
    import torch

    from tunelab.training.config import instantiate
    from tunelab.training.dpo import DPOFields, check_loss_settings
    from tunelab.training.spine import BaseTrainConfig, check_settings

    if not isinstance(cfg, BaseTrainConfig):
        return
    check_settings(cfg)
    if isinstance(cfg, DPOFields):
        check_loss_settings(cfg)
    instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))], allowed_components=cfg.allowed_components)


def validate_config(config: str, overrides: list[str], recipe: str | None = None) -> list[str]:
    """All problems with a config (empty list = OK), found as the run would find them (see the
    module docstring); builds nothing but the optimizer, on a stand-in parameter."""
    from tunelab.recipes.registry import RECIPES, recipe_file, recipe_schema
    from tunelab.training.config import (
        apply_overrides,
        error_lines,
        load_config,
        parse_config,
        resolve_config_path,
    )

    config_path = resolve_config_path(config)
    recipe = recipe or _guess_recipe(config, config_path)
    if recipe is None:
        raise ConfigError(
            f"cannot tell which recipe config '{config}' is for; pass --recipe NAME_OR_PATH"
        )
    file = recipe_file(recipe)
    spec = RECIPES.get(recipe)
    class_name = spec.config_class if spec is not None else "RecipeConfig"

    errors: list[str] = []
    schema = None
    try:
        schema = recipe_schema(file, class_name)
    except TunelabError as e:
        errors.extend(error_lines(e))
    cfg = apply_overrides(load_config(config_path), overrides, schema)  # as the run applies them
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # interpolation to a missing key etc.
        return [f"cannot resolve config: {' '.join(str(e).split())}"]
    if schema is not None:
        try:
            run_checks(parse_config(data, schema))
        except TunelabError as e:
            errors.extend(error_lines(e))
    errors.extend(check_paths(data))  # type: ignore[arg-type]
    return errors


def cmd_validate(args: argparse.Namespace) -> int:
    import sys

    errors = validate_config(args.config, list(args.overrides), args.recipe)
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    print("config OK")
    return 0
