"""`tune ls`, `tune cp`, `tune cat`: the built-in recipes and configs as files."""

from __future__ import annotations

import argparse
import difflib
import shutil
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["add_parsers", "cmd_cat", "cmd_cp", "cmd_ls"]


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("ls", help="list recipes and their configs")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser(
        "cp",
        help="copy a built-in recipe (.py) or config (.yaml) to edit it",
        description="Copy a built-in recipe or config. DEST may be a folder; the right suffix "
        "is added when DEST has none. Run the copy with `tune run ./copy.py --config ./copy.yaml`.",
    )
    p.add_argument("name", metavar="RECIPE_OR_CONFIG")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.set_defaults(func=cmd_cp)

    p = subparsers.add_parser("cat", help="print a config's YAML")
    p.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
    p.set_defaults(func=cmd_cat)


def cmd_ls(args: argparse.Namespace) -> int:
    from tunelab.recipes.registry import available_recipes

    rows = [(spec.name, spec.available_configs()) for spec in available_recipes()]
    width = max([len("RECIPE")] + [len(name) for name, _ in rows]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for name, configs in rows:
        for i, config in enumerate(configs or [""]):
            print(f"{name if i == 0 else '':<{width}}{config}".rstrip())
    return 0


def _resolve_source(name: str, dest: str) -> Path:
    """The built-in file `name` refers to (recipe .py or config .yaml)."""
    from tunelab.recipes.registry import RECIPES, available_recipes
    from tunelab.training.config import builtin_config_names, configs_dir

    recipe = RECIPES.get(name)
    recipe_file = recipe.file if recipe is not None and recipe.exists() else None
    config_name = name[:-5] if name.endswith(".yaml") else name
    config_file = configs_dir() / f"{config_name}.yaml"
    config_file = config_file if config_file.is_file() else None
    if recipe_file and config_file:
        suffix = Path(dest).suffix
        if suffix == ".py":
            return recipe_file
        if suffix in (".yaml", ".yml"):
            return config_file
        raise ConfigError(
            f"'{name}' is both a recipe and a config: give DEST a .py or .yaml suffix"
        )
    if recipe_file or config_file:
        return recipe_file or config_file  # type: ignore[return-value]
    choices = [s.name for s in available_recipes()] + builtin_config_names()
    match = difflib.get_close_matches(name, choices, n=1)
    hint = f" — did you mean '{match[0]}'?" if match else ""
    raise ConfigError(f"no built-in recipe or config named '{name}'{hint} (see `tune ls`)")


def cmd_cp(args: argparse.Namespace) -> int:
    source = _resolve_source(args.name, args.dest)
    dest = Path(args.dest).expanduser()
    if dest.is_dir() or args.dest.endswith(("/", "\\")):
        dest = dest / source.name
    elif dest.suffix == "":
        dest = dest.with_suffix(source.suffix)
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it")
    if dest.exists() and dest.is_dir():
        raise ConfigError(f"{dest} is a folder; give a file name")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    except OSError as e:
        raise ConfigError(f"cannot copy to {dest}: {e.strerror or e}") from None
    print(f"copied {source.name} to {dest}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from tunelab.training.config import resolve_config_path

    path = resolve_config_path(args.config)
    print(path.read_text(), end="")
    return 0
