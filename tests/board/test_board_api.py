"""`tune board` HTTP API against a real server (uvicorn in a thread) and real `tune run` children.

Covers: the runs listing (status, recipe inferred from config.yaml, checkpoints), incremental
metrics reads, config form types, refused keys (the same lines `tune run` prints), launch /
finish / stop of tiny/lora, and the token on a non-loopback bind. Runs are short (max_steps
<= 6 to finish) and every child is stopped at teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tunelab.cli.board_app.runs import META_FILE, RunManager  # noqa: E402
from tunelab.cli.board_app.server import COOKIE, create_app  # noqa: E402
from tunelab.cli.main import main  # noqa: E402
from tunelab.training.config import resolve_config_path  # noqa: E402

RECIPE = "lora_finetune_single_device"
TINY_YAML = resolve_config_path("tiny/lora").read_text()


def write_rows(path: Path, rows: list[dict], mode: str = "a") -> None:
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def fake_run(root: Path, name: str, steps: list[int], ckpt: int | None = None, age_s: float = 0) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(TINY_YAML)
    write_rows(d / "metrics.jsonl", [{"step": s, "epoch": 0, "loss": 5.0 - s / 10, "lr": 1e-3,
                                      "tokens_per_s": 100.0 + s, "grad_norm": 1.0} for s in steps])
    if ckpt is not None:
        (d / f"step_{ckpt}").mkdir()
        (d / f"step_{ckpt}" / "COMPLETE").write_text("")
    if age_s:
        old = time.time() - age_s
        for p in d.iterdir():
            os.utime(p, (old, old))
    return d


def test_runs_listing_metrics_and_config(manager, bt):
    root = manager.runs_dir
    fake_run(root, "done", [1, 2, 3], ckpt=3)
    fake_run(root, "crashed", [1, 2], age_s=3600)
    live = fake_run(root, "live", [1])
    (root / "not-a-run").mkdir()
    dpo = root / "dpo"
    dpo.mkdir()
    (dpo / "config.yaml").write_text(resolve_config_path("tiny/dpo").read_text())
    write_rows(dpo / "metrics.jsonl", [{"step": 1, "loss": 0.69, "rewards/accuracy": 0.5, "rewards/margins": 0.0}])
    with bt.serve(create_app(root, manager=manager)) as url:
        status, data, _ = bt.request(f"{url}/api/runs")
        assert status == 200
        runs = {r["name"]: r for r in data["runs"]}
        assert set(runs) == {"done", "crashed", "live", "dpo"}
        assert runs["dpo"]["recipe"] == "lora_dpo_single_device" and runs["dpo"]["reward_accuracy"] == 0.5
        assert runs["done"]["status"] == "finished" and runs["done"]["checkpoints"] == ["step_3"]
        assert runs["done"]["recipe"] == RECIPE  # inferred: config.yaml keys == the recipe's settings
        assert runs["done"]["last_step"] == 3 and runs["done"]["loss"] == pytest.approx(4.7)
        assert runs["crashed"]["status"] == "failed" and runs["live"]["status"] == "running"

        # metrics: incremental by byte offset; half-written lines wait; a rewritten file resets
        status, m, _ = bt.request(f"{url}/api/runs/live/metrics?offset=0")
        assert [r["step"] for r in m["rows"]] == [1] and not m["reset"]
        offset = m["offset"]
        with open(live / "metrics.jsonl", "a") as f:
            f.write('{"step": 2, "loss": 4.1')  # the writer is mid-line
        _, m, _ = bt.request(f"{url}/api/runs/live/metrics?offset={offset}")
        assert m["rows"] == [] and m["offset"] == offset
        with open(live / "metrics.jsonl", "a") as f:
            f.write(', "lr": 0.001}\n{"step": 3, "eval_loss": 3.9}\n')
        _, m, _ = bt.request(f"{url}/api/runs/live/metrics?offset={offset}")
        assert m["rows"] == [{"step": 2, "loss": 4.1, "lr": 0.001}, {"step": 3, "eval_loss": 3.9}]
        write_rows(live / "metrics.jsonl", [{"step": 1, "loss": 9.0}], mode="w")  # resume rewrote it
        _, m, _ = bt.request(f"{url}/api/runs/live/metrics?offset={m['offset']}")
        assert m["reset"] and m["rows"] == [{"step": 1, "loss": 9.0}]

        status, text, _ = bt.request(f"{url}/api/runs/done/config")
        assert status == 200 and text == TINY_YAML
        status, text, headers = bt.request(f"{url}/api/runs/done/config?download=1")
        assert 'attachment; filename="done.yaml"' in headers["Content-Disposition"] and text == TINY_YAML
        for bad in ("nope", "..", "%2e%2e%2fetc"):
            status, data, _ = bt.request(f"{url}/api/runs/{bad}/metrics")
            assert status == 404, bad
        status, page, _ = bt.request(f"{url}/")
        assert status == 200 and "tunelab board" in page


def test_config_form_fields_are_typed(manager):
    form = manager.config_form(RECIPE, "tiny/lora")
    fields = {f["key"]: f for f in form["fields"]}
    assert fields["max_steps"]["kind"] == "int" and fields["max_steps"]["nullable"]
    assert fields["packing"]["kind"] == "bool" and fields["packing"]["value"] == "false"
    assert fields["dtype"]["kind"] == "choice" and fields["dtype"]["choices"] == ["bf16", "fp32"]
    assert fields["optimizer.lr"]["kind"] == "float" and float(fields["optimizer.lr"]["value"]) == 3e-3
    assert fields["lora.targets"]["kind"] == "list" and json.loads(fields["lora.targets"]["value"])[0] == "q_proj"
    assert fields["lr_scheduler.schedule"]["choices"] == ["cosine", "linear", "constant"]
    assert fields["output_dir"]["readonly"]
    assert form["yaml"] == TINY_YAML


def test_refused_keys_are_the_cli_errors(manager, bt, capsys, tmp_path):
    bad = ["max_step=3", "lora.rnak=4", "optimizer.lrr=0.1", "dtype=fp16"]
    with bt.serve(create_app(manager.runs_dir, manager=manager)) as url:
        status, data, _ = bt.request(f"{url}/api/validate", {"recipe": RECIPE, "config": "tiny/lora", "overrides": bad})
        board_errors = data["errors"]
        status, data, _ = bt.request(f"{url}/api/runs", {"name": "typo", "recipe": RECIPE, "config": "tiny/lora",
                                                          "overrides": bad})
        assert status == 400 and data["errors"] == board_errors
        assert not (manager.runs_dir / "typo").exists()

        # the CLI refuses the same keys with the same lines
        code = main(["run", RECIPE, "--config", "tiny/lora", *bad, f"output_dir={tmp_path / 'cli'}"])
        cli_errors = [line[len("error: "):] for line in capsys.readouterr().err.splitlines()
                      if line.startswith("error: ")]
        assert code == 1 and len(board_errors) == 4
        assert sorted(board_errors) == sorted(cli_errors)
        assert any("did you mean 'max_steps'" in e for e in board_errors)

        def refused(name="x", recipe=RECIPE, config="tiny/lora", overrides=()):
            status, data, _ = bt.request(f"{url}/api/runs", {"name": name, "recipe": recipe, "config": config,
                                                              "overrides": list(overrides)})
            assert status == 400, data
            return " ".join(data["errors"])

        outside = tmp_path / "evil.py"
        outside.write_text("print('never run')\n")
        assert "inside the runs folder" in refused(recipe=str(outside))
        (tmp_path / "c.yaml").write_text(TINY_YAML)
        assert "inside the runs folder" in refused(config=str(tmp_path / "c.yaml"))
        assert "inside the runs folder" in refused(config="../c.yaml")
        assert "did you mean 'lora_finetune_single_device'" in refused(recipe="lora_finetune_single_devise")
        assert "output_dir is set by the board" in refused(overrides=["output_dir=/etc"])
        # a request can neither widen the component allowlist nor read the board's environment,
        # and a component outside the allowlist is refused (os.system here) without running it
        assert "allowed_components cannot be set from the board" in refused(
            overrides=["allowed_components=[os.*]", "optimizer.foreach._component_=os.system"])
        assert "interpolation is not accepted" in refused(overrides=["dataset.source=${oc.env:HOME}"])
        assert "not an allowed component" in refused(overrides=["+optimizer.foreach._component_=os.system",
                                                                "+optimizer.foreach.command=touch pwned"])
        for bad in (["allowed_components=[os.*]"], ["seed=${oc.env:HOME}"]):
            status, data, _ = bt.request(f"{url}/api/validate", {"recipe": RECIPE, "config": "tiny/lora",
                                                                  "overrides": bad})
            assert status == 400 and data["errors"], data
        assert "bad run name" in refused(name="../up")
        assert "bad run name" in refused(name="-rf")
        assert not list(manager.runs_dir.iterdir())

        # a config file inside the runs folder is offered and accepted
        (manager.runs_dir / "mine.yaml").write_text(TINY_YAML)
        _, recipes, _ = bt.request(f"{url}/api/recipes")
        assert recipes["local_configs"] == ["mine.yaml"]
        assert any(r["name"] == RECIPE and "tiny/lora" in r["configs"] for r in recipes["recipes"])
        _, data, _ = bt.request(f"{url}/api/validate", {"recipe": RECIPE, "config": "mine.yaml",
                                                         "overrides": ["max_steps=2"]})
        assert data["errors"] == []


@pytest.mark.timeout(150)
def test_launch_finish_and_stop_tiny_lora(manager, bt, tiny_ready):
    with bt.serve(create_app(manager.runs_dir, manager=manager)) as url:
        def launch(name, *overrides):
            status, data, _ = bt.request(f"{url}/api/runs", {"name": name, "recipe": RECIPE, "config": "tiny/lora",
                                                              "overrides": list(overrides)})
            assert status == 200, data
            assert data["status"] == "running"
            return data

        # heldout_accuracy=null: these runs test the board, not the demo's before/after scoring
        launch("short", "max_steps=6", "log_every_n_steps=2", "save_merged=never", "heldout_accuracy=null")
        launch("long", "max_steps=500", "log_every_n_steps=1", "save_merged=never", "eval_every_n_steps=null",
               "heldout_accuracy=null")
        status, data, _ = bt.request(f"{url}/api/runs", {"name": "short", "recipe": RECIPE, "config": "tiny/lora",
                                                          "overrides": []})
        assert status == 400 and "already exists" in data["errors"][0]
        manager.max_running = 2  # both just started: a third launch is over the cap
        status, data, _ = bt.request(f"{url}/api/runs", {"name": "third", "recipe": RECIPE, "config": "tiny/lora",
                                                          "overrides": ["max_steps=6"]})
        assert status == 429 and "still running" in data["errors"][0]
        assert not (manager.runs_dir / "third").exists()

        def long_started():
            _, m, _ = bt.request(f"{url}/api/runs/long/metrics")
            return m["rows"]

        bt.wait_for(long_started, timeout=60, what="the long run's first metrics row")
        pid = json.loads((manager.runs_dir / "long" / META_FILE).read_text())["pid"]
        # a board restarted on the same folder still sees the child (pid + its command line)
        assert RunManager(manager.runs_dir).info("long")["status"] == "running"
        status, info, _ = bt.request(f"{url}/api/runs/long/stop", {})
        assert status == 200 and info["status"] == "stopped"
        assert info["returncode"] != 0 and info["last_step"] < 500
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

        # follow the short run's metrics the way the page does: offsets, each row once
        seen, offset = [], 0

        def short_done():
            nonlocal offset
            _, m, _ = bt.request(f"{url}/api/runs/short/metrics?offset={offset}")
            seen.extend(m["rows"])
            offset = m["offset"]
            _, info, _ = bt.request(f"{url}/api/runs/short")
            return info if info["status"] != "running" else None

        info = bt.wait_for(short_done, timeout=90, what="the short run to finish")
        _, m, _ = bt.request(f"{url}/api/runs/short/metrics?offset={offset}")
        seen.extend(m["rows"])
        assert info["status"] == "finished", bt.request(f"{url}/api/runs/short/log")[1]
        assert info["returncode"] == 0 and info["checkpoints"] == ["step_6"] and info["last_step"] == 6
        assert [r["step"] for r in seen if "loss" in r] == [1, 2, 4, 6]
        assert [r["step"] for r in seen if "eval_loss" in r] == [6]
        _, log, _ = bt.request(f"{url}/api/runs/short/log")
        assert "training 6 steps" in log["log"]
        meta = json.loads((manager.runs_dir / "short" / META_FILE).read_text())
        assert meta["argv"][:4] == [sys.executable, "-m", "tunelab.cli.main", "run"]  # a list, no shell
        assert meta["argv"][-1] == f"output_dir={manager.runs_dir / 'short'}"
        _, text, _ = bt.request(f"{url}/api/runs/short/config")
        assert "max_steps: 6" in text

        status, data, _ = bt.request(f"{url}/api/runs/long/stop", {})
        assert status == 400 and "not running" in data["errors"][0]
        assert RunManager(manager.runs_dir).info("long")["status"] == "stopped"


def test_loopback_bind_checks_host_and_json(manager, bt):
    with bt.serve(create_app(manager.runs_dir, manager=manager)) as url:
        status, _, _ = bt.request(f"{url}/api/runs", headers={"Host": "attacker.example:80"})
        assert status == 403  # DNS rebinding: a page on another name cannot read the API
        status, _, _ = bt.request(f"{url}/api/runs", b"name=x", content_type="text/plain")
        assert status == 415  # a cross-site form post is refused
        # a body announced over the limit is refused before it is read (the client sends 2 bytes)
        import http.client
        from urllib.parse import urlsplit

        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
        conn.request("POST", "/api/validate", body=b"{}", headers={"Content-Type": "application/json",
                                                                   "Content-Length": str(8 << 20)})
        response = conn.getresponse()
        assert response.status == 413 and b"request body over" in response.read()
        conn.close()
        assert not list(manager.runs_dir.iterdir())


@pytest.mark.timeout(60)
def test_token_required_on_non_loopback_bind(tmp_path, bt):
    runs = tmp_path / "runs"
    fake_run(runs, "secret-run", [1, 2], ckpt=2)
    port = bt.free_port()
    # 127.0.0.2 is loopback to the kernel but not one of the names the board trusts: it must
    # behave exactly as for a public address, and no traffic leaves the machine
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli.main", "board", "--runs", str(runs),
                             "--host", "127.0.0.2", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, "board exited: " + "".join(lines)
            lines.append(line)
            if line.startswith("token: "):
                token = line.split()[1]
                break
        url = f"http://127.0.0.2:{port}"
        assert any(f"{url}/?token={token}" in line for line in lines)
        def up():
            try:
                return bt.request(f"{url}/api/runs")[0] == 401
            except OSError:  # printed the token, not listening yet
                return False

        bt.wait_for(up, timeout=20, what="the server")

        for path in ("/", "/api/runs", "/api/runs/secret-run", "/api/runs/secret-run/metrics",
                     "/api/runs/secret-run/config", "/static/app.js", "/api/recipes"):
            status, body, _ = bt.request(url + path)
            assert status == 401 and "secret-run" not in json.dumps(body), path
            status, _, _ = bt.request(url + path, headers={"Authorization": "Bearer wrong" + token})
            assert status == 401, path
        status, _, _ = bt.request(f"{url}/api/runs", {"name": "x", "recipe": RECIPE, "config": "tiny/lora"})
        assert status == 401 and not (runs / "x").exists()
        status, _, _ = bt.request(f"{url}/api/runs/secret-run/stop", {})
        assert status == 401

        status, data, _ = bt.request(f"{url}/api/runs", headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and [r["name"] for r in data["runs"]] == ["secret-run"]
        status, page, headers = bt.request(f"{url}/?token={token}")
        assert status == 200 and "tunelab board" in page
        assert f"{COOKIE}={token}" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        status, _, _ = bt.request(f"{url}/static/app.js", headers={"Cookie": f"{COOKIE}={token}"})
        assert status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_board_without_its_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["board", "--runs", "/nonexistent/never-created"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tunelab[board]'" in err and len(err.splitlines()) == 1


def test_junk_requests_get_4xx_never_a_crash(manager, bt):
    """Generated bad bodies for the launching and validating endpoints: every answer is a 4xx
    with one-line errors (never a 500), and nothing is written anywhere."""
    import itertools

    junk_values = [None, 0, -1, 1.5, True, "", "x" * 500, [], {}, [1], {"a": 1}, ["a=1", 2], ["\x00=1"],
                   ["~nope"], ["seed=${oc.env:HOME}"], ["=1"], ["lora.rank=[[[[1]]]]"]]
    fields = ("name", "recipe", "config", "overrides")
    with bt.serve(create_app(manager.runs_dir, manager=manager)) as url:
        for endpoint, (field, value) in itertools.product(("api/runs", "api/validate"),
                                                          itertools.product(fields, junk_values)):
            body = {"name": "fz", "recipe": RECIPE, "config": "tiny/lora", "overrides": ["max_steps=1"], field: value}
            status, data, _ = bt.request(f"{url}/{endpoint}", body)
            if status == 200:  # a junk value that is valid after all (e.g. an empty override list)
                if endpoint == "api/runs":
                    manager.stop_all()
                continue
            assert 400 <= status < 500, (endpoint, field, value, status, data)
            assert data["errors"] and all("\n" not in e and "Traceback" not in e for e in data["errors"]), data
        status, data, _ = bt.request(f"{url}/api/runs", b"[not json", content_type="application/json")
        assert 400 <= status < 500
    # only the one well-formed launch made a folder (junk in a field the launch ignores)
    assert {p.name for p in manager.runs_dir.iterdir()} <= {"fz"}


def test_taken_port_is_one_line_and_no_url(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["board", "--runs", str(tmp_path), "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert "open http" not in out
    assert err.count("\n") == 1 and err.startswith(f"error: tune board: cannot listen on 127.0.0.1:{port} (")
    assert "pick another --port" in err


@pytest.mark.timeout(120)
def test_runs_stop_with_the_board_unless_detached(tmp_path, bt, tiny_ready):
    """`tune board` in its own process: a run launched from it is stopped (Ctrl-C, then its
    folder says so) when the board gets Ctrl-C; with --detach a run keeps training, and a board
    started later on the same folder (its run manager) shows it running and can stop it."""
    import signal

    def board(*extra):
        port = bt.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli.main", "board", "--runs", str(tmp_path),
                                 "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONSAFEPATH="1"))
        assert "tune board: runs under" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        bt.wait_for(lambda: _up(url), timeout=30, what="the board to answer")
        return proc, url

    def _up(url):
        try:
            return bt.request(f"{url}/api/runs", timeout=2)[0] == 200
        except OSError:
            return False

    def launch(url, name):
        status, data, _ = bt.request(f"{url}/api/runs", {"name": name, "recipe": RECIPE, "config": "tiny/lora",
                                                          "overrides": ["max_steps=2000", "log_every_n_steps=1",
                                                                        "eval_every_n_steps=null",
                                                                        "heldout_accuracy=null"]})
        assert status == 200, data
        bt.wait_for(lambda: (tmp_path / name / "metrics.jsonl").exists(), timeout=60, what=f"{name}'s first step")
        return json.loads((tmp_path / name / META_FILE).read_text())["pid"]

    proc, url = board()
    pid = launch(url, "attached")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped 1 run(s) this board launched (attached)" in err, err
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert RunManager(tmp_path).info("attached")["status"] == "stopped"

    proc, url = board("--detach")
    pid = launch(url, "detached")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "still training (detached), detached" in err
    os.kill(pid, 0)  # still alive
    later = RunManager(tmp_path)  # what a board started later on the folder sees, and can do
    assert {r["name"]: r["status"] for r in later.list_runs()} == {"attached": "stopped", "detached": "running"}
    assert later.stop("detached")["status"] == "stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
