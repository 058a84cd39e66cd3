"""The board in a real browser: headless Chromium (Debian's package) driven by Playwright.

Opens the page, sees a typo refused, launches tiny/lora from the form, watches the loss chart
gain points while the run trains, launches a second run with a lower lr (overlaid), and saves a screenshot under the test's temp folder (and as
``tunelab/cli/board_app/board.png``, the README's image, when TUNELAB_UPDATE_SCREENSHOT=1).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background traffic is refused by a closed network; these flags keep it quiet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
README_IMAGE = Path(__file__).resolve().parents[2] / "cli" / "board_app" / "board.png"


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "playwright (pip)" if sync_playwright is None else (
        None if os.path.exists(CHROMIUM) else "chromium (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):  # .ci/run installs both: a skip there would hide a broken install
            pytest.fail(f"browser test needs {missing}")
        pytest.skip(f"browser test needs {missing}")
    return sync_playwright


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.timeout(180)
def test_board_in_chromium_launches_and_draws_live_curve(manager, bt, tiny_ready, tmp_path):
    from tunelab.cli.board_app.server import create_app

    sync_playwright = _browser_or_skip()
    with bt.serve(create_app(manager.runs_dir, manager=manager)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            problems = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url + "/?poll=400")  # refresh every 0.4 s instead of 1.5 s
            page.wait_for_selector("#fields [data-key=max_steps]")
            assert page.input_value("#config") == "tiny/lora"

            # a typo is refused with the CLI's message and launches nothing
            page.fill("#run-name", "typo")
            page.fill("#extra", "max_step=3")
            page.click("#launch")
            page.wait_for_selector("#errors li")
            assert "did you mean 'max_steps'" in page.inner_text("#errors")
            assert not (manager.runs_dir / "typo").exists()

            # smaller steps, and no held-out scoring (~10 s a run on 2 cores): the curves are the point here
            page.fill("#extra", "batch_size=4\nheldout_accuracy=null")
            page.fill("#run-name", "tiny-lora")
            page.fill("#fields [data-key=max_steps]", "80")
            page.fill("#fields [data-key=log_every_n_steps]", "2")
            page.fill("#fields [data-key=eval_every_n_steps]", "20")
            page.select_option("#fields [data-key=save_merged]", "never")
            page.click("#launch")
            page.wait_for_selector("tr[data-run=tiny-lora]")

            def points() -> int:
                value = page.get_attribute("#chart-loss", "data-points") if page.query_selector("#chart-loss") else None
                return int(value or 0)

            first = bt.wait_for(lambda: points() >= 2 and points(), timeout=90, what="loss points")
            status_then = page.inner_text("tr[data-run=tiny-lora] .status")
            bt.wait_for(lambda: points() > first, timeout=60, what="the loss curve to gain points")
            assert status_then == "running"  # the points came in while it trained

            # a second run with a lower lr, overlaid on the same charts for comparison
            page.fill("#run-name", "tiny-lora-lr1e-3")
            page.fill("#fields [data-key='optimizer.lr']", "1.0e-3")
            page.click("#launch")
            page.wait_for_selector("tr[data-run=tiny-lora-lr1e-3]")
            for name in ("tiny-lora", "tiny-lora-lr1e-3"):
                bt.wait_for(lambda: page.inner_text(f"tr[data-run={name}] .status") == "finished", timeout=90,
                            what=f"run {name} to finish")
            page.wait_for_timeout(1500)  # a few more polls: the last points and the final log lines
            assert points() >= 2 * 45  # per run: loss at steps 1, 2, 4, ..., 80 and eval loss at 20, 40, 60, 80
            assert page.get_attribute("#chart-loss", "data-series") == "4"  # 2 runs x (loss, eval_loss)
            assert "optimizer.lr=1.0e-3" in page.inner_text("#detail-cmd")
            assert "lr: 0.001" in page.inner_text("#config-yaml")
            assert page.query_selector("#chart-lr") and page.query_selector("#chart-grad")
            assert "step_80" in page.inner_text("tr[data-run=tiny-lora]")
            assert "training 80 steps" in page.inner_text("#log")  # the details of the newest run
            assert "max_steps: 80" in page.inner_text("#config-yaml")
            assert not problems, problems

            page.evaluate("window.scrollTo(0, 0)")  # launching scrolled to the form; show the runs and curves
            shot = tmp_path / "board.png"
            page.screenshot(path=str(shot))
            assert png_size(shot) == (1280, 1000)
            assert shot.stat().st_size > 20_000  # a page with charts, not a blank one
            if os.environ.get("TUNELAB_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, README_IMAGE)
        finally:
            browser.close()
