"""The board's model of a runs folder: listing, metrics, config forms, launching and stopping.

Nothing here knows about HTTP; ``server`` exposes it. A *run* is a direct sub-folder of the
runs folder that holds a ``metrics.jsonl``, a ``config.yaml`` or a ``board_run.json``. Runs the
board launches get two extra files beside the recipe's outputs:

* ``board_run.json``: recipe, config, overrides, the exact argument list, pid, start/end time,
  exit code and whether the board stopped it.
* ``board.log``: the child's stdout + stderr (what `tune run` prints).

Status: ``running`` / ``finished`` (exit 0) / ``failed`` (non-zero exit) / ``stopped`` (stopped
from the board) for launched runs. Runs started elsewhere (`tune run ... output_dir=RUNS/x`) have
no process to ask, so: ``finished`` when the newest complete checkpoint is at or past the last
logged step, else ``running`` while metrics.jsonl changed in the last ``STALE_S`` seconds, else
``failed``.

Launching builds an argument list (never a shell string): ``python -m tunelab.cli.main run
RECIPE --config CONFIG key=value ... output_dir=RUNS/NAME``. Only built-in recipes/configs and
``.py`` / ``.yaml`` files inside the runs folder can be launched, and the overrides are checked
with the same functions `tune validate` / `tune run` use, so the board refuses exactly what the
CLI refuses, with the same messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import ConfigError, TunelabError
from tunelab.run_layout import complete_steps, lock_holder, step_dir

__all__ = ["LOG_FILE", "MAX_RUNNING", "META_FILE", "Busy", "NotFound", "RunManager", "read_rows"]

META_FILE = "board_run.json"
LOG_FILE = "board.log"
STALE_S = 120.0  # an external run whose metrics did not move for this long is not running
STOP_GRACE_S = 8.0  # Ctrl-C first (the recipe exits cleanly), SIGKILL after this
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_RUNNING = 4  # runs launched by one board at once: a request cannot fork without bound
_MAX_CHUNK = 4 << 20  # metrics bytes returned per request; the client asks again for the rest


class NotFound(TunelabError):
    """No such run (or file of a run)."""


class Busy(TunelabError):
    """The board already runs as many runs as it may launch (HTTP 429)."""

    http_status = 429


# --------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------


def read_rows(path: Path, offset: int = 0) -> tuple[list[dict], int, bool]:
    """Complete JSON lines of ``path`` from byte ``offset`` on.

    Returns:
        (rows, next_offset, reset): a half-written last line is left for the next call;
        ``reset`` is True when the file shrank below ``offset`` (a resumed run rewrote it), in
        which case the rows are read from the start.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0, offset > 0
    reset = offset > size
    if reset:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(_MAX_CHUNK)
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset, reset
    rows = []
    for line in chunk[: end + 1].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a corrupt line must not hide the rest of the curve
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end + 1, reset


def _tail(path: Path, max_bytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:  # drop the partial first line
        text = text.split("\n", 1)[-1]
    # tqdm redraws with \r; keep only the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _pid_runs_in(pid: int, run_dir: Path) -> bool:
    """True if ``pid`` is alive and its command line names ``run_dir`` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return f"output_dir={run_dir}" in cmdline.split("\0")


def _to_text(value: Any) -> str:
    """A value as it is typed on the command line (YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON flow style is valid YAML
    return str(value)


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class RunManager:
    """Everything the board does with a runs folder.

    Args:
        runs_dir: folder holding one sub-folder per run (created if missing).
        python: interpreter for launched runs (default: this one).
        max_running: runs it launched that may run at once; one more launch is refused.
    """

    def __init__(self, runs_dir: str | Path, python: str = sys.executable, max_running: int = MAX_RUNNING):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.max_running = max_running
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._summary_cache: dict[Path, tuple[tuple[int, int], dict]] = {}
        self._schema_fields: dict[str, set[str]] | None = None

    # ---------------------------------------------------------------- listing
    def _run_dir(self, name: str) -> Path:
        if not _NAME_RE.match(name or ""):
            raise NotFound(f"no run named {name!r}")
        path = self.runs_dir / name
        if not path.is_dir():
            raise NotFound(f"no run named {name!r} under {self.runs_dir}")
        return path

    def _meta(self, run_dir: Path) -> dict:
        try:
            return json.loads((run_dir / META_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_meta(self, run_dir: Path, meta: dict) -> None:
        tmp = run_dir / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, run_dir / META_FILE)  # readers never see half a file

    def _metrics_summary(self, run_dir: Path) -> dict:
        path = run_dir / "metrics.jsonl"
        try:
            st = path.stat()
        except FileNotFoundError:
            return {"last_step": None, "loss": None, "eval_loss": None, "tokens_per_s": None, "mtime": None}
        key = (st.st_size, st.st_mtime_ns)
        cached = self._summary_cache.get(path)
        if cached and cached[0] == key:
            return cached[1]
        rows, _, _ = read_rows(path)
        summary: dict[str, Any] = {"last_step": None, "loss": None, "eval_loss": None, "tokens_per_s": None}
        for row in rows:
            if isinstance(row.get("step"), int):
                summary["last_step"] = max(summary["last_step"] or 0, row["step"])
            for k in ("loss", "eval_loss", "tokens_per_s", "rewards/accuracy"):
                if row.get(k) is not None:
                    summary[k] = row[k]
        summary["mtime"] = st.st_mtime
        self._summary_cache[path] = (key, summary)
        return summary

    def _infer_recipe(self, run_dir: Path) -> str | None:
        """Recipe of a run started outside the board: the one whose settings match config.yaml."""
        try:
            import yaml

            keys = set(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        if self._schema_fields is None:
            from tunelab.recipes.registry import available_recipes, recipe_schema

            self._schema_fields = {}
            for spec in available_recipes():
                try:
                    schema = recipe_schema(spec.file, spec.config_class)
                except Exception:  # a broken recipe must not break the listing
                    continue
                fields = dataclasses.fields(schema)
                required = {f.name for f in fields if f.default is dataclasses.MISSING
                            and f.default_factory is dataclasses.MISSING}
                self._schema_fields[spec.name] = (required, {f.name for f in fields})
        for name, (required, every) in self._schema_fields.items():
            if required <= keys <= every:  # keys with a default may be missing from older runs
                return name
        return None

    def _status(self, name: str, run_dir: Path, meta: dict, summary: dict, steps: list[int]) -> str:
        proc = self._procs.get(name)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return "running"
            return "stopped" if meta.get("stopped") else ("finished" if code == 0 else "failed")
        if meta.get("returncode") is not None:
            code = meta["returncode"]
            return "stopped" if meta.get("stopped") else ("finished" if code == 0 else "failed")
        if meta.get("pid") and _pid_runs_in(meta["pid"], run_dir):
            return "running"  # launched by an earlier board process that has since exited
        if lock_holder(run_dir) is not None:
            return "running"  # a live run holds the folder (tunelab.run_layout.take_lock)
        last = summary.get("last_step")
        if steps and last is not None and steps[-1] >= last:
            return "finished"
        mtimes = [p.stat().st_mtime for p in (run_dir / "metrics.jsonl", run_dir / "config.yaml") if p.exists()]
        if mtimes and time.time() - max(mtimes) < STALE_S:
            return "running"
        return "failed"

    def info(self, name: str) -> dict:
        """Summary of one run (what the runs table shows)."""
        run_dir = self._run_dir(name)
        meta = self._meta(run_dir)
        summary = self._metrics_summary(run_dir)
        steps = complete_steps(run_dir)  # the complete step_N folders, oldest first
        return {
            "name": name,
            "recipe": meta.get("recipe") or self._infer_recipe(run_dir),
            "config": meta.get("config"),
            "overrides": meta.get("overrides", []),
            "launched_by_board": bool(meta),
            "status": self._status(name, run_dir, meta, summary, steps),
            "returncode": meta.get("returncode"),
            "started": meta.get("started"),
            "ended": meta.get("ended"),
            "last_step": summary["last_step"],
            "loss": summary["loss"],
            "eval_loss": summary["eval_loss"],
            "tokens_per_s": summary["tokens_per_s"],
            "reward_accuracy": summary.get("rewards/accuracy"),
            "checkpoints": [step_dir(run_dir, s).name for s in steps],
            "has_config": (run_dir / "config.yaml").is_file(),
        }

    def list_runs(self) -> list[dict]:
        """Every run under the runs folder, newest first."""
        runs = []
        for child in self.runs_dir.iterdir():
            if not child.is_dir() or not _NAME_RE.match(child.name):
                continue
            if not any((child / f).exists() for f in ("metrics.jsonl", "config.yaml", META_FILE)):
                continue
            try:
                runs.append((child.stat().st_mtime, self.info(child.name)))
            except (NotFound, OSError):
                continue  # deleted while we looked
        return [info for _, info in sorted(runs, key=lambda r: r[0], reverse=True)]

    def metrics(self, name: str, offset: int = 0) -> dict:
        """Rows of ``metrics.jsonl`` from byte ``offset`` on (poll with the returned offset)."""
        rows, next_offset, reset = read_rows(self._run_dir(name) / "metrics.jsonl", max(0, int(offset)))
        return {"rows": rows, "offset": next_offset, "reset": reset}

    def log_tail(self, name: str, max_bytes: int = 16_000) -> str:
        """The end of the run's ``board.log`` (empty for runs not launched by the board)."""
        return _tail(self._run_dir(name) / LOG_FILE, max_bytes)

    def config_yaml(self, name: str) -> str:
        """The resolved config the recipe saved (``output_dir/config.yaml``)."""
        path = self._run_dir(name) / "config.yaml"
        if not path.is_file():
            raise NotFound(f"run {name!r} has no config.yaml yet (the recipe writes it once its config parsed)")
        return path.read_text()

    # ---------------------------------------------------------------- recipes and configs
    def _local_files(self, *suffixes: str) -> list[str]:
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_file() and p.suffix in suffixes)

    def recipes(self) -> dict:
        """Built-in recipes with their configs, and recipe/config files in the runs folder."""
        from tunelab.recipes.registry import available_recipes

        return {
            "recipes": [{"name": s.name, "configs": s.available_configs(), "builtin": True}
                        for s in available_recipes() if not s.distributed]
            + [{"name": f, "configs": [], "builtin": False} for f in self._local_files(".py")],
            "local_configs": self._local_files(".yaml", ".yml"),
        }

    def _inside_runs(self, text: str, suffixes: tuple[str, ...], what: str) -> Path:
        path = Path(text)
        path = (path if path.is_absolute() else self.runs_dir / path).resolve()
        if path.suffix not in suffixes or not path.is_file() or not path.is_relative_to(self.runs_dir):
            raise ConfigError(
                f"{what} '{text}' is neither built in nor a {'/'.join(suffixes)} file inside the runs folder "
                f"{self.runs_dir}; the board only launches those"
            )
        return path

    def resolve_recipe(self, recipe: str) -> tuple[str, str]:
        """(argument for `tune run`, settings class name) for a built-in name or a runs-folder .py."""
        from tunelab.recipes.registry import RECIPES

        spec = RECIPES.get(recipe)
        if spec is not None and spec.exists():
            if spec.distributed:
                raise ConfigError(f"recipe '{recipe}' needs torchrun; launch it with `tune run` from a shell")
            return spec.name, spec.config_class
        if "/" not in recipe and not recipe.endswith(".py"):
            from tunelab.recipes.registry import recipe_file

            recipe_file(recipe)  # raises the CLI's "unknown recipe ... did you mean" error
        return str(self._inside_runs(recipe, (".py",), "recipe")), "RecipeConfig"

    def resolve_config(self, config: str) -> Path:
        """YAML path of a built-in config name or a runs-folder .yaml file."""
        from tunelab.training.config import builtin_config_names, resolve_config_path

        if config in builtin_config_names():
            return resolve_config_path(config)
        if "/" not in config and not config.endswith((".yaml", ".yml")):
            resolve_config_path(config)  # raises the CLI's "not found ... did you mean" error
        return self._inside_runs(config, (".yaml", ".yml"), "config")

    def config_form(self, recipe: str, config: str) -> dict:
        """Typed form fields for a config, from its YAML and the recipe's settings dataclass.

        Each field: ``key`` (dotted), ``kind`` (bool|int|float|str|choice|list|yaml), ``value``
        (as typed on a command line), ``nullable``, ``choices`` (for choice), ``readonly``.
        """
        from omegaconf import OmegaConf

        from tunelab.recipes.registry import recipe_file, recipe_schema
        from tunelab.training.config import load_config

        recipe_arg, class_name = self.resolve_recipe(recipe)
        path = self.resolve_config(config)
        try:
            data = OmegaConf.to_container(load_config(path), resolve=True)
        except TunelabError:
            raise
        except Exception as e:
            raise ConfigError(f"cannot resolve config {config}: {' '.join(str(e).split())}") from None
        schema = recipe_schema(recipe_file(recipe_arg), class_name)
        fields: list[dict] = []
        _form_fields(data, schema, "", fields)
        return {"recipe": recipe, "config": config, "fields": fields, "yaml": path.read_text()}

    # ---------------------------------------------------------------- launching
    def _check_overrides(self, overrides: list[str]) -> list[str]:
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError("overrides must be a list of strings like key.sub=value or ~key")
        clean = []
        for item in overrides:
            item = item.strip()
            if not item:
                continue
            if "\x00" in item or "\n" in item:
                raise ConfigError(f"bad override {item!r}: one key=value per entry, no line breaks")
            key = item[1:] if item.startswith("~") else item.partition("=")[0].strip().lstrip("+")
            if key == "output_dir":
                raise ConfigError("output_dir is set by the board (runs folder / run name); change the run name instead")
            # what a request may not do: widen the component allowlist, or read the board's
            # environment and config through OmegaConf's ${...} interpolation and resolvers
            if key.split(".")[0] == "allowed_components":
                raise ConfigError(f"override '{key}': allowed_components cannot be set from the board; list "
                                  "them in the config file")
            if "${" in item:
                raise ConfigError(f"override '{key}': ${{...}} interpolation is not accepted from the board; "
                                  "write the value itself")
            clean.append(item)
        return clean

    def validate(self, recipe: str, config: str, overrides: list[str]) -> list[str]:
        """Problems with a launch (empty = OK), exactly as `tune validate` reports them.

        Raises:
            ConfigError: an override a request may not make (``_check_overrides``).
        """
        from tunelab.cli.validate import validate_config
        from tunelab.training.config import error_lines

        overrides = self._check_overrides(overrides)  # a refused override is a bad request (400)
        try:
            recipe_arg, _ = self.resolve_recipe(recipe)
            path = self.resolve_config(config)
            # output_dir as the launch will set it, so path checks and the recipe see the real one
            return validate_config(str(path), [*overrides, f"output_dir={self.runs_dir / 'x'}"], recipe_arg)
        except TunelabError as e:
            return error_lines(e)

    def launch(self, name: str, recipe: str, config: str, overrides: list[str]) -> dict:
        """Start ``tune run`` for a new run folder ``RUNS/name``; returns its info.

        Raises:
            ConfigError / ConfigErrors: bad name, existing run, or what `tune validate` refuses.
            Busy: ``max_running`` launched runs are still running.
        """
        from tunelab.training.config import ConfigErrors

        if not _NAME_RE.match(name or ""):
            raise ConfigError(f"bad run name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not starting with . or -)")
        errors = self.validate(recipe, config, overrides)
        if errors:
            raise ConfigErrors(errors)
        recipe_arg, _ = self.resolve_recipe(recipe)
        config_path = self.resolve_config(config)
        overrides = self._check_overrides(overrides)
        run_dir = self.runs_dir / name
        with self._lock:
            if len(self.running()) >= self.max_running:
                raise Busy(f"{self.max_running} runs this board launched are still running (the cap); stop one "
                           "or wait for one to finish")
            try:
                run_dir.mkdir()
            except FileExistsError:
                raise ConfigError(f"run '{name}' already exists under {self.runs_dir}; pick another name") from None
            argv = [self.python, "-m", "tunelab.cli.main", "run", recipe_arg, "--config", str(config_path),
                    *overrides, f"output_dir={run_dir}"]
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
            log = open(run_dir / LOG_FILE, "wb")
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            # a new session: stop() signals the whole group (torch may spawn workers), and a
            # Ctrl-C in the board's terminal does not kill runs
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
            meta = {"recipe": recipe, "config": config, "overrides": overrides, "argv": argv, "pid": proc.pid,
                    "started": time.time(), "ended": None, "returncode": None, "stopped": False}
            self._write_meta(run_dir, meta)
            self._procs[name] = proc
        threading.Thread(target=self._watch, args=(name, proc, log), daemon=True).start()
        return self.info(name)

    def _watch(self, name: str, proc: subprocess.Popen, log) -> None:
        code = proc.wait()
        log.close()
        run_dir = self.runs_dir / name
        with self._lock:
            meta = self._meta(run_dir)
            meta.update(returncode=code, ended=time.time())
            self._write_meta(run_dir, meta)

    def stop(self, name: str, grace_s: float = STOP_GRACE_S) -> dict:
        """Stop a running run: Ctrl-C (SIGINT) to its process group, SIGKILL after ``grace_s``."""
        run_dir = self._run_dir(name)
        proc = self._procs.get(name)
        meta = self._meta(run_dir)
        if proc is not None and proc.poll() is None:
            pid = proc.pid
        elif proc is None and meta.get("pid") and meta.get("returncode") is None and _pid_runs_in(meta["pid"], run_dir):
            pid = meta["pid"]  # launched by an earlier board process
        else:
            raise ConfigError(f"run '{name}' is not running")
        with self._lock:
            meta.update(stopped=True)
            self._write_meta(run_dir, meta)
        _signal_group(pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid, proc):
            time.sleep(0.05)
        if _alive(pid, proc):
            _signal_group(pid, signal.SIGKILL)
            if proc is not None:
                proc.wait(timeout=10)
        if proc is not None:
            proc.wait(timeout=10)
            for _ in range(200):  # the watcher records the exit code
                if self._meta(run_dir).get("returncode") is not None:
                    break
                time.sleep(0.01)
        else:
            meta = self._meta(run_dir)
            meta.update(returncode=-int(signal.SIGINT), ended=time.time())
            self._write_meta(run_dir, meta)
        return self.info(name)

    def running(self) -> list[str]:
        """Names of runs this manager launched that are still running."""
        return [n for n, p in self._procs.items() if p.poll() is None]

    def stop_all(self, grace_s: float = 3.0) -> None:
        """Stop every run this manager launched (tests, shutdown)."""
        for name in self.running():
            try:
                self.stop(name, grace_s=grace_s)
            except TunelabError:
                pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Config -> typed form fields
# --------------------------------------------------------------------------------------------


def _kind_of(tp: Any, value: Any) -> tuple[str, bool, list[str] | None]:
    """(kind, nullable, choices) for a field's annotation, or its value when unannotated."""
    nullable = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(tp)
    if origin is Literal:
        return "choice", nullable, [str(a) for a in typing.get_args(tp)]
    if tp is bool:
        return "bool", nullable, None
    if tp is int:
        return "int", nullable, None
    if tp is float:
        return "float", nullable, None
    if tp in (str, Path):
        return "str", nullable, None
    if origin in (list, tuple) or tp in (list, tuple):
        return "list", nullable, None
    if tp is dict or origin is dict:
        return "yaml", True, None
    # a keyword argument under a _component_ node: typed by its current value
    if isinstance(value, bool):
        return "bool", False, None
    if isinstance(value, int):
        return "int", False, None
    if isinstance(value, float):
        return "float", False, None
    if isinstance(value, list):
        return "list", False, None
    return "str", value is None, None


def _form_fields(data: dict, schema: type | None, prefix: str, out: list[dict]) -> None:
    hints: dict[str, Any] = {}
    if schema is not None and dataclasses.is_dataclass(schema):
        try:
            hints = typing.get_type_hints(schema)
        except Exception:
            hints = {f.name: f.type for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        tp = hints.get(key, Any)
        if isinstance(value, dict):
            sub = tp if dataclasses.is_dataclass(tp) else None
            _form_fields(value, sub, full, out)
            continue
        kind, nullable, choices = _kind_of(tp, value)
        out.append({"key": full, "kind": kind, "value": _to_text(value), "nullable": nullable,
                    "choices": choices, "readonly": full == "output_dir"})
