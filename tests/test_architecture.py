"""The import rules of docs/architecture.md, checked on the source (an AST walk, lazy imports
inside functions included), and every library module importable.

Layers, each importing only from those below it (never above):

    cli -> recipes -> training -> models -> modules -> kernels
                              \\-> data (beside models: models and data never import each other)

``errors`` and ``run_layout`` are leaves anyone may import. Kernels import only torch and
triton. The plain decoder modules import nothing from ``modules/peft``, ``modules/nf4`` or
``modules/loss``: LoRA and quantization come in by composition. Test oracles (transformers,
peft, bitsandbytes, trl, tokenizers, llama_cpp) are never imported by library code.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import tunelab

ROOT = Path(tunelab.__file__).resolve().parent
LIBRARY = ("cli", "configs", "data", "kernels", "models", "modules", "recipes", "training")
LEAVES = ("errors", "run_layout")
# what each top-level package may import from tunelab (besides itself and the leaves)
ALLOWED = {
    "kernels": set(),
    "modules": {"kernels"},
    "data": set(),
    "models": {"modules", "kernels"},
    "training": {"models", "modules", "data", "configs"},  # configs: the YAML files' folder
    "recipes": {"training", "models", "modules", "data", "configs"},
    "cli": {"recipes", "training", "models", "modules", "data", "kernels", "configs"},
    "configs": set(),
}
PLAIN_MODULES = ("attention", "feed_forward", "rms_norm", "rope", "transformer", "projections", "recompute",
                 "generation")
ORACLES = {"transformers", "peft", "bitsandbytes", "trl", "tokenizers", "llama_cpp"}
def _library_files() -> list[Path]:
    files = [ROOT / f"{leaf}.py" for leaf in LEAVES] + [ROOT / "__init__.py"]
    for package in LIBRARY:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def _imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("tunelab", *path.relative_to(ROOT).parent.parts))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def _where(name: str) -> str | None:
    """The top-level part of tunelab a module name is in (None: outside tunelab)."""
    parts = name.split(".")
    return parts[1] if parts[0] == "tunelab" and len(parts) > 1 else None


def _violations() -> set[tuple[str, str]]:
    """(file, what it imports against the rules) for every library file."""
    found = set()
    for path in _library_files():
        rel = path.relative_to(ROOT)
        file = rel.as_posix()
        source = rel.parts[0] if len(rel.parts) > 1 else None  # None: a root leaf
        plain = source == "modules" and rel.parts[1].removesuffix(".py") in PLAIN_MODULES
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in ORACLES:
                found.add((file, parts[0]))
            if source == "kernels" and parts[0] not in ("tunelab", "torch", "triton", "__future__") \
                    and parts[0] not in sys.stdlib_module_names:
                found.add((file, parts[0]))
            target = _where(name)
            if plain and target == "modules" and len(parts) > 2 and parts[2] in ("peft", "nf4", "loss"):
                found.add((file, f"modules.{parts[2]}"))
            if target is None or target == source or target in LEAVES:
                continue
            if source is None or target not in ALLOWED[source]:
                found.add((file, target))
    return found


def test_imports_follow_the_layers():
    found = sorted(_violations())
    assert not found, "imports against docs/architecture.md's layers (file, what it imports):\n" + "\n".join(
        f"  {f} -> {t}" for f, t in found)


def test_no_cycles_between_top_level_packages():
    edges: dict[str, set[str]] = {}
    for path in _library_files():
        rel = path.relative_to(ROOT)
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for name in _imports(path):
            target = _where(name)
            if target is not None and target != source:
                edges.setdefault(source, set()).add(target)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in edges if p in reach(p))
    assert not cycles, f"import cycles through {cycles}"


@pytest.mark.parametrize("path", [p for p in _library_files() if p.name != "make_assets.py"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_module_imports(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    importlib.import_module(".".join(("tunelab", *parts)))


def test_importing_a_recipe_does_not_import_the_compiler():
    """torch._dynamo costs ~1 s of every process's start (each torchrun rank, every `tune`
    command): a recipe imports it only when it compiles or offloads."""
    import subprocess

    code = ("import sys, tunelab.recipes.lora_finetune_single_device, tunelab.recipes.lora_dpo_distributed, "
            "tunelab.cli.main; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
