"""Lines per recipe and the share of non-trivial lines a single-device recipe and its
distributed twin have in common (issue 20's measure of a shared spine).

    python bench/recipe_overlap.py [ROOT]      # ROOT: a checkout (default: this one)

Non-trivial lines: code, without blank lines, comments, docstrings and imports, each stripped
of its trailing comment. Identical lines are those difflib matches in order between the two
files; the share is matched lines / the file's non-trivial lines (both files reported).
"""

from __future__ import annotations

import ast
import difflib
import io
import sys
import tokenize
from pathlib import Path

PAIRS = [("lora_finetune_single_device", "lora_finetune_distributed"), ("lora_dpo_single_device", "lora_dpo_distributed")]


def nontrivial(path: Path) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    code: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        for line in range(tok.start[0], tok.end[0] + 1):
            if line not in skip:
                code.setdefault(line, "")
    lines = source.splitlines()
    out = []
    for n in sorted(code):
        text = lines[n - 1]
        stripped = text.split("  #")[0].strip()
        if stripped and stripped not in ("from __future__ import annotations",):
            out.append(stripped)
    return out


def main(root: Path) -> None:
    for single, dist in PAIRS:
        a, b = (nontrivial(root / "recipes" / f"{n}.py") for n in (single, dist))
        matched = sum(block.size for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
        total = {n: len((root / "recipes" / f"{n}.py").read_text().splitlines()) for n in (single, dist)}
        print(f"{single}: {total[single]} lines, {len(a)} non-trivial; {dist}: {total[dist]} lines, {len(b)} "
              f"non-trivial; identical {matched}: {matched / len(a):.0%} of {single}, {matched / len(b):.0%} of {dist}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
