"""Long-context QLoRA as shipped (``llama3_1/8B_qlora_long_context``, batch 1): tok/s and peak at
fixed lengths, then the longest row that trains on this GPU.

Every run is ``bench/finetune.py --profile long`` in its own process (an out-of-memory run
ends only its process), all sharing one ``run_id``. The search doubles the length from
``--start`` until a run fails, then bisects between the last length that trained and the
first that did not, to ``--step`` tokens; its result line says ``workload: max_seq`` with
``max_seq_len`` (the longest that trained), ``cap_gib`` (the GPU's memory), ``host_gib`` (the
pinned host memory that run peaked at; the config caps it at 100 GiB) and that run's
tokens/s and peak.

    python bench/long_context.py                           # GPU: 32k, 131k, 262k, then the search
    python bench/long_context.py --lengths 64 128 --start 256 --limit 1024 --step 128 --shape tiny  # CPU smoke
    Env: BENCH_OUT (append every line there too), TUNELAB_BENCH_CACHE (finetune.py's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import emit  # noqa: E402

FINETUNE = Path(__file__).resolve().parent / "finetune.py"


def _label(seq: int) -> str:
    return f"qlora_1x{seq // 1024}k" if seq % 1024 == 0 else f"qlora_1x{seq}"


def run(seq: int, args, run_id: str, steps: int, warmup: int) -> dict | None:
    """One finetune.py run at ``seq`` tokens; its result line, or None if it failed (OOM)."""
    cmd = [sys.executable, str(FINETUNE), "--profile", "long", "--seq", str(seq), "--batch", "1",
           "--shape", args.shape, "--steps", str(steps), "--warmup", str(warmup), "--workload", _label(seq),
           "--run-id", run_id]
    env = {**os.environ, "BENCH_OUT": ""}  # this script writes the lines it keeps
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"seq {seq}: failed ({tail[:200]})", file=sys.stderr, flush=True)
        return None
    return lines[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072, 262144])
    ap.add_argument("--start", type=int, default=262144, help="first length of the search (0: no search)")
    ap.add_argument("--limit", type=int, default=1 << 20, help="longest length tried")
    ap.add_argument("--step", type=int, default=16384, help="the search's resolution, in tokens")
    ap.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    run_id = os.environ.get("BENCH_RUN_ID") or f"long-{time.strftime('%Y%m%d-%H%M%S')}"

    for seq in args.lengths:
        line = run(seq, args, run_id, args.steps, args.warmup)
        if line is not None:
            emit(line)
    if not args.start:
        return
    good, bad, best = 0, None, None
    seq = args.start
    while seq <= args.limit:  # double until a run fails
        line = run(seq, args, run_id, 1, 1)
        if line is None:
            bad = seq
            break
        good, best, seq = seq, line, seq * 2
    if bad is not None:
        while bad - good > args.step:  # bisect on multiples of the step
            mid = (good + bad) // 2 // args.step * args.step
            if mid <= good:
                break
            line = run(mid, args, run_id, 1, 1)
            if line is None:
                bad = mid
            else:
                good, best = mid, line
    if best is None:
        print(f"no length from {args.start} trained", file=sys.stderr)
        sys.exit(1)
    emit({**best, "workload": "max_seq", "max_seq_len": good, "search_limit": args.limit,
          "first_failed": bad})


if __name__ == "__main__":
    main()
