"""`tune run`: run a recipe script with a config, in-process or under torchrun.

    tune run RECIPE --config NAME_OR_PATH [key.sub=value ...] [~key]
    tune run --nproc_per_node 2 [other torchrun flags] RECIPE --config ... [overrides]

RECIPE is a built-in recipe name (`tune ls`) or a path to a ``.py`` file (e.g. one made with
`tune cp`); the config is a built-in name or a YAML path. Without torchrun flags the recipe
runs in this process exactly as ``python RECIPE_FILE --config CONFIG_PATH overrides`` would;
with them, this process is replaced by ``python -m torch.distributed.run FLAGS RECIPE_FILE
--config CONFIG_PATH overrides``.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["RunArgs", "add_parser", "build_torchrun_cmd", "parse_run_args", "run_command"]

USAGE = (
    "usage: tune run [torchrun flags, e.g. --nproc_per_node N] RECIPE --config NAME_OR_PATH "
    "[key.sub=value ...] [~key]"
)

# torchrun flags that take no value; every other --flag before RECIPE consumes the next token
# unless written as --flag=value.
_TORCHRUN_SWITCHES = {
    "--standalone",
    "--no_python",
    "--no-python",
    "--run_path",
    "--run-path",
    "--module",
    "-m",
}


@dataclass
class RunArgs:
    """Parsed `tune run` arguments."""

    recipe: str
    config: str
    overrides: list[str] = field(default_factory=list)
    launcher_flags: list[str] = field(default_factory=list)


def add_parser(subparsers) -> None:
    # Registered for `tune --help` only; main() hands `run` to run_command before argparse.
    subparsers.add_parser("run", help="run a recipe with a config (torchrun flags allowed)",
                          add_help=False)


def parse_run_args(argv: Sequence[str]) -> RunArgs:
    """Split ``[torchrun flags] RECIPE --config X [overrides]``.

    Raises:
        ConfigError: no recipe, no ``--config``, or an unknown ``--option`` after the recipe.
    """
    args = list(argv)
    flags: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i]
        if flag == "--config":
            raise ConfigError(f"--config comes after the recipe name. {USAGE}")
        flags.append(flag)
        if "=" not in flag and flag not in _TORCHRUN_SWITCHES:
            if i + 1 >= len(args):
                raise ConfigError(f"torchrun flag {flag} needs a value. {USAGE}")
            flags.append(args[i + 1])
            i += 1
        i += 1
    if i >= len(args):
        raise ConfigError(f"missing RECIPE. {USAGE}")
    recipe = args[i]
    config = None
    overrides: list[str] = []
    rest = args[i + 1 :]
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg == "--config":
            if j + 1 >= len(rest):
                raise ConfigError(f"--config needs a value. {USAGE}")
            config = rest[j + 1]
            j += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(
                f"unknown option '{arg}' after the recipe: only --config and key=value / ~key "
                f"overrides go there (torchrun flags go before the recipe). {USAGE}"
            )
        else:
            overrides.append(arg)
        j += 1
    if not config:
        raise ConfigError(f"missing --config NAME_OR_PATH (see `tune ls`). {USAGE}")
    return RunArgs(recipe=recipe, config=config, overrides=overrides, launcher_flags=flags)


def build_torchrun_cmd(
    launcher_flags: Sequence[str], recipe_file: Path, config_path: Path, overrides: Sequence[str]
) -> list[str]:
    """Command line that launches a recipe through torchrun with this Python interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher_flags,
        str(recipe_file),
        "--config",
        str(config_path),
        *overrides,
    ]


def _exec(cmd: list[str]) -> None:
    """Replace this process by ``cmd`` (a seam for tests)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def run_in_process(recipe_file: Path, config_path: Path, overrides: Sequence[str]) -> int:
    """Run a recipe script as ``__main__`` with its argv; returns the exit code.

    TunelabError raised at the script's top level propagates (the CLI prints it).
    """
    old_argv = sys.argv
    sys.argv = [str(recipe_file), "--config", str(config_path), *overrides]
    try:
        runpy.run_path(str(recipe_file), run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)  # sys.exit("message") convention
        return 1
    finally:
        sys.argv = old_argv
    return 0


def run_command(argv: Sequence[str]) -> int:
    """`tune run ...`; returns the exit code."""
    if not argv:
        raise ConfigError(f"missing RECIPE. {USAGE}")
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.split("\n\n", 2)[-1].strip())
        return 0
    from tunelab.recipes.registry import recipe_file
    from tunelab.training.config import resolve_config_path

    from tunelab.recipes.registry import RECIPES

    args = parse_run_args(argv)
    file = recipe_file(args.recipe).resolve()
    config_path = resolve_config_path(args.config).resolve()
    flags = list(args.launcher_flags)
    spec = RECIPES.get(args.recipe)
    if not flags and spec is not None and spec.distributed:
        # A distributed recipe needs torchrun's environment even on one GPU.
        print(
            f"note: {spec.name} runs under torchrun; using --nproc_per_node 1 "
            "(pass --nproc_per_node N before the recipe name for more)",
            file=sys.stderr,
        )
        flags = ["--nproc_per_node", "1"]
    if flags:
        _exec(build_torchrun_cmd(flags, file, config_path, args.overrides))
        return 0  # only reached when _exec is replaced in tests
    return run_in_process(file, config_path, args.overrides)
