"""The README's speed tables are generated from bench/results (never typed by hand): the
README section must equal what bench/report.py renders now, and every row it renders names a
commit (or is a peer line with its source)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_speed_section_is_the_generated_one():
    report = _report()
    assert report.readme_section((ROOT / "README.md").read_text()) == report.render(), (
        "README speed tables are stale: run `python bench/report.py --write`")


def test_every_result_line_has_the_required_fields():
    for path in sorted((ROOT / "bench" / "results").glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line)
            assert "device" in row, f"{path.name}:{n}"
            if str(row.get("profile", "")).startswith("peer_") and row.get("commit") is None:
                # copied from the shared notes (source) or measured beside a tunelab commit (same_run_as)
                assert row.get("source") or row.get("same_run_as"), f"{path.name}:{n}: a peer line names its origin"
