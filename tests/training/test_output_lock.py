"""One run per output folder: tunelab.run_layout's lock (the recipes' use of it: tests/recipes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tunelab.errors import ConfigError
from tunelab.run_layout import LOCK, lock_holder, release_lock, take_lock


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        (tmp_path / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "start": start}))
        assert lock_holder(tmp_path)["pid"] == sleeper.pid
        with pytest.raises(ConfigError, match=f"in use by the run with pid {sleeper.pid}") as info:
            take_lock(tmp_path)
        assert "\n" not in str(info.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock_holder(tmp_path) is None  # its process is gone (kill -9)
    take_lock(tmp_path)
    assert "taking over the lock" in capsys.readouterr().out
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()
