"""`tune plot`: the board's curves as a PNG (matplotlib)."""

from __future__ import annotations

import json
import struct

import pytest

from tunelab.cli.main import main

pytest.importorskip("matplotlib")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _write_run(d, dpo=False, n=20, grpo=False):
    d.mkdir(parents=True)
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-3 * s / n, "tokens_per_s": 500.0 + s, "grad_norm": 1.0}
        if dpo:
            row.update({"rewards/accuracy": min(1.0, s / n), "rewards/margins": 0.1 * s})
        if grpo:
            row.update({"reward/mean": 0.3 + s / (2 * n), "kl": 0.001 * s})
        rows.append(row)
        if s % 10 == 0:
            rows.append({"step": s, "epoch": 0, "eval_loss": 3.5 / s})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_tune_plot_writes_a_sane_png(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    out = run / "loss.png"
    assert f"wrote {out}" in capsys.readouterr().out
    w, h = _png_size(out)
    assert (w, h) == (1200, 680)  # 2 x 2 panels of 6 x 3.4 inches at 100 dpi
    assert out.stat().st_size > 10_000  # drawn lines and text, not an empty canvas

    # DPO panels appear when a run logged rewards; several runs overlay
    dpo = _write_run(tmp_path / "dpo", dpo=True, n=30)
    target = tmp_path / "both.png"
    assert main(["plot", str(run), str(dpo), "--out", str(target), "--dpi", "50"]) == 0
    assert _png_size(target) == (600, 510)  # 3 rows of panels at 50 dpi
    grpo = _write_run(tmp_path / "grpo", grpo=True)  # the mean reward and KL panels: 6 panels, 3 rows
    assert main(["plot", str(grpo), "--out", str(tmp_path / "grpo.png"), "--dpi", "50"]) == 0
    assert _png_size(tmp_path / "grpo.png") == (600, 510)


def test_tune_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl not found" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert "no metric rows yet" in capsys.readouterr().err
