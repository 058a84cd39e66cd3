"""`tune`: run recipes, list/copy/print/validate configs, download checkpoints.

    tune run [torchrun flags] RECIPE --config NAME_OR_PATH [key.sub=value ...] [~key]
    tune ls
    tune cp RECIPE_OR_CONFIG DEST [--force]
    tune cat CONFIG
    tune validate CONFIG [key.sub=value ...] [--recipe RECIPE]
    tune download REPO_ID --output-dir DIR [--hf-token T] [--repo-type model|dataset]
    tune board [--runs DIR] [--host 127.0.0.1] [--port 8080]
    tune plot OUTPUT_DIR [--out loss.png]
    tune export gguf --checkpoint DIR [--adapter DIR] --out FILE.gguf [--dtype f16|bf16|q8_0|q4_k_m]

Each subcommand lives in its own module with ``add_parser(subparsers)``, which registers the
arguments and sets ``func(args) -> int``. Bad input (a ``TunelabError``) is printed as
``error: <message>`` lines on stderr with exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tunelab.errors import ConfigError, TunelabError, path_error

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a TunelabError (one line, exit 1)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from tunelab.cli import board, download, export, files, plot, run, validate

    parser = _Parser(
        prog="tune",
        description="tunelab: fine-tune Llama-family models with LoRA/QLoRA recipes.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run.add_parser(subparsers)
    files.add_parsers(subparsers)
    validate.add_parser(subparsers)
    download.add_parser(subparsers)
    board.add_parser(subparsers)
    plot.add_parser(subparsers)
    export.add_parser(subparsers)
    return parser


def _print_errors(exc: BaseException) -> None:
    from tunelab.training.config import error_lines

    for line in error_lines(exc):
        print(f"error: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tune`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] == "run":
            # `run` passes torchrun flags and recipe overrides through untouched, so it parses
            # its own arguments instead of going through argparse.
            from tunelab.cli.run import run_command

            return run_command(args_list[1:])
        parser = build_parser()
        # Overrides (key=value, ~key) may come before or after options such as --recipe;
        # argparse's positional matching cannot interleave them, so collect leftovers here.
        args, extra = parser.parse_known_args(args_list)
        if extra:
            if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
                bad = [e for e in extra if e.startswith("-")] or extra
                parser.error(f"unrecognized arguments: {' '.join(bad)}")
            args.overrides = list(args.overrides) + extra
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0 if not args_list else 1
        return int(args.func(args) or 0)
    except TunelabError as e:
        _print_errors(e)
        return 1
    except BrokenPipeError:  # `tune ls | head`: the reader left; the rest of the output is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as e:
        if (line := path_error(e)) is None:
            raise
        _print_errors(line)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
