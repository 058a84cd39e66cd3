"""Fixtures for the board tests: a private tiny-model cache, a live server in a thread, HTTP."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest


@pytest.fixture(scope="session", autouse=True)
def _board_cache(tmp_path_factory):
    """builtin:tiny is built once per session in a private cache (children inherit the env)."""
    cache = tmp_path_factory.getbasetemp() / "tunelab_cache"  # same folder as tests/recipes uses
    old = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("TUNELAB_CACHE", None)
    else:
        os.environ["TUNELAB_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_ready(_board_cache):
    """Build the tiny checkpoint before launching runs, so concurrent runs never race on it."""
    from tunelab.training.builtin import tiny_checkpoint

    return tiny_checkpoint()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, host: str = "127.0.0.1"):
    """Run ``app`` under uvicorn in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("board server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def request(url: str, data=None, *, method: str | None = None, headers: dict | None = None,
            content_type: str = "application/json", timeout: float = 30):
    """(status, parsed JSON or text, headers) of one HTTP request; never raises on 4xx/5xx."""
    body = None
    hdrs = dict(headers or {})
    if data is not None:
        body = json.dumps(data).encode() if not isinstance(data, bytes) else data
        hdrs["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, rh = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, raw, rh = e.code, e.read(), e.headers
    text = raw.decode()
    try:
        return status, json.loads(text), rh
    except ValueError:
        return status, text, rh


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; returns its value or fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def bt():
    """The helpers above, as a fixture (test files cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(serve=serve, request=request, wait_for=wait_for, free_port=free_port)


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A RunManager over a fresh runs folder; every run it launched is stopped at teardown."""
    from tunelab.cli.board_app.runs import RunManager

    # tiny runs gain nothing from threads, and concurrent children would fight over 2 cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    runs = RunManager(tmp_path / "runs")
    yield runs
    runs.stop_all(grace_s=2.0)
