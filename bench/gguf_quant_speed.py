"""Throughput of the GGUF tensor encoders (models/gguf/quants.py) on one CPU matrix.

Encodes a [4096, 4096] float32 matrix of N(0, 0.02) weights (one Llama-8B attention
projection) with ``quants.quantize`` per ggml type and reports weights per second (best of
``--repeats`` timed calls after a warm-up call on 256 rows). With ``--baseline REV`` the
``quants.py`` of that git revision is timed the same way, interleaved call by call with the
working tree's (so a neighbour's load on a shared machine hits both alike), and every row says
whether the two produced identical bytes. Baseline rows carry REV as their commit.

    python bench/gguf_quant_speed.py --baseline HEAD --out bench/results/gguf_cpu.jsonl
    python bench/gguf_quant_speed.py --baseline HEAD --threads 1   # one core
    Env: BENCH_OUT (also append the lines here).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tunelab.models.gguf import quants

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("BF16", "F16", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def quants_at(rev: str):
    """models/gguf/quants.py as of git revision ``rev``, imported as a standalone module."""
    source = subprocess.run(["git", "show", f"{rev}:models/gguf/quants.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = Path(tempfile.mkdtemp(prefix="quants_")) / f"quants_{sha}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"quants_{sha}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, sha


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=None, help="git revision whose quants.py is timed alongside")
    p.add_argument("--threads", type=int, default=None,
                   help="cap encoder and torch threads (default: the module's own choice, one per core)")
    p.add_argument("--out", default=None, help="also append the lines here (default: $BENCH_OUT)")
    args = p.parse_args(argv)

    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    impls = [("working tree", quants, None)]
    if args.baseline:
        module, sha = quants_at(args.baseline)
        impls.insert(0, (f"git:{sha}", module, sha))
    if args.threads is not None:  # e.g. 1: a per-core figure, steadier on a shared machine
        for _, module, _ in impls:
            module.MAX_THREADS = args.threads
        torch.set_num_threads(args.threads)
    threads = min(quants.MAX_THREADS, os.cpu_count() or 1)
    for name in args.types:
        qtype = GGMLQuantizationType[name]
        best = {impl: float("inf") for impl, _, _ in impls}
        outputs = {}
        for impl, module, _ in impls:
            module.quantize(x[:256], qtype)  # warm-up: imports, thread pool, allocator
        for _ in range(args.repeats):
            for impl, module, _ in impls:
                start = time.perf_counter()
                outputs[impl] = module.quantize(x, qtype)
                best[impl] = min(best[impl], time.perf_counter() - start)
        identical = None
        if len(impls) > 1:
            ref = outputs[impls[0][0]]
            identical = all(o.shape == ref.shape and bool((o == ref).all()) for o in outputs.values())
        for impl, _, sha in impls:
            row = {
                "device": "cpu",
                "profile": "gguf_quant_speed",
                "config": {"qtype": name, "shape": [args.rows, args.cols], "impl": impl, "repeats": args.repeats,
                           "encoder_threads": threads, "torch_threads": torch.get_num_threads(),
                           "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                           "load_avg_1m": round(os.getloadavg()[0], 2)},
                "seconds": round(best[impl], 4),
                "weights_per_s": round(x.size / best[impl]),
                "bytes_identical_to_baseline": identical,
                "tokens_per_s": None,
                "peak_gib": None,
            }
            if sha is not None:
                row["commit"] = sha  # the quants.py measured is that revision's
            emit(row, args.out)


if __name__ == "__main__":
    main()
