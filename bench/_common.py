"""Pieces every benchmark script shares: the commit stamp, a random Llama, the result line.

The scripts put bench/ on sys.path themselves (``python bench/x.py`` does it, but not under
PYTHONSAFEPATH=1, which CI sets).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from tunelab.models import build_model, llama3_1_8b, tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def commit() -> str:
    """``git rev-parse --short HEAD`` (+ ``-dirty``), or $TUNELAB_COMMIT where the tree travels
    without .git (the GPU machine)."""
    if os.environ.get("TUNELAB_COMMIT"):
        return os.environ["TUNELAB_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def _fill(module: torch.nn.Module, gen: torch.Generator, prefix: str = "") -> None:
    for name, p in module.named_parameters(prefix=prefix):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)  # random, never zeros


def random_model(shape: str, device: torch.device, dtype: torch.dtype, *, nf4: bool = False):
    """Llama-3.1-8B shape (``"8b"``) or a tiny one, built on meta and materialised piece by piece
    on ``device`` with N(0, 0.02) weights (norms at 1). With ``nf4`` each decoder layer's
    projections are quantized right after the layer is filled, so the peak holds the NF4 model
    plus one dense layer (as ``quantize: nf4`` loading does)."""
    args = llama3_1_8b() if shape == "8b" else tiny(vocab_size=1024)
    model = build_model(args, device="meta", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, child in model.named_children():
        if name != "layers":
            child.to_empty(device=device)
            _fill(child, gen, prefix=name)
    for layer in model.layers:
        layer.to_empty(device=device)
        _fill(layer, gen)
        if nf4:
            from tunelab.modules.nf4 import quantize_linears_

            quantize_linears_(layer, skip=())
    model.reset_rope(device)
    return model


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reserved_gib(device: torch.device) -> float | None:
    """Peak memory the caching allocator held (CUDA graph pools included)."""
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if device.type == "cuda" else None


def emit(row: dict, out: str | None = None) -> None:
    """Print the result line (commit, date and the TUNELAB_* switches set added) and append it to ``out`` / $BENCH_OUT if set
    (not $OUT: on the GPU machine that names the folder of files that come back)."""
    switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TUNELAB_") and k != "TUNELAB_COMMIT"}
    row = {"commit": commit(), **row, **({"env": switches} if switches else {}), "date": time.strftime("%Y-%m-%d")}
    line = json.dumps(row)
    print(line, flush=True)
    out = out or os.environ.get("BENCH_OUT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def lora_train_step(model, optimizer, tokens: torch.Tensor, labels: torch.Tensor, *, graph: bool = False):
    """The workload's training step as a closure returning the loss: the recipe's loss (fused
    chunked linear + cross-entropy on CUDA, summed, / label count), backward, optimizer step.
    With ``graph`` the step is captured once and replayed as a CUDA graph
    (:class:`tunelab.training.cuda_graph.GraphedStep`; the optimizer must be capturable)."""
    from tunelab.kernels import loss_sum

    from torch.profiler import record_function  # names the phases in host_gaps' op stacks

    def body() -> torch.Tensor:
        with record_function("step.forward"):
            hidden = model(tokens, return_hidden=True)  # (b, s, dim)
        with record_function("step.loss"):
            loss = loss_sum(hidden, model.output_weight, labels) / labels.numel()
        with record_function("step.backward"):
            loss.backward()
        with record_function("step.optimizer"):
            optimizer.step()
        return loss.detach()

    if graph:
        from tunelab.training.cuda_graph import GraphedStep

        graphed = GraphedStep(body, {}, lambda: optimizer.zero_grad(set_to_none=True))
        return lambda: graphed().item()

    def step() -> float:
        loss = body()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step, *, warmup: int, steps: int, device: torch.device, reset_peak: bool = True) -> tuple[float, float]:
    """Run ``step()`` warmup times, reset the peak-memory counter, then time ``steps`` calls.

    ``reset_peak=False`` keeps the warm-up in the peak: a CUDA-graph step allocates only while
    it is captured (in the first call), and its replays reuse that memory without counting it.
    Either way the peak starts from what was allocated before the first call.

    Returns (seconds for the timed steps, the last step's return value)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # model building is not the step's memory
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda" and reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = float("nan")
    for _ in range(steps):
        result = step()
    sync()
    return time.perf_counter() - start, result


# Kernel-name fragments -> phase, first match wins (cuBLAS on Hopper names its GEMMs nvjet_* or
# sm90_xmma_*; our Triton kernels carry their function names; inductor's start with triton_).
PHASES = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("nvjet", "gemm", "xmma", "cutlass", "cublas", "splitk")),
    ("fused_ce", ("_ce_", "cross_entropy", "logsumexp")),
    ("rms_norm", ("rms",)),
    ("rope", ("rope",)),
    ("swiglu", ("swiglu", "silu")),
    ("nf4", ("nf4", "dequant")),
    ("lora_triton", ("lora",)),
    ("inductor", ("triton_",)),
    ("optimizer", ("multi_tensor", "adam")),
    ("copy", ("memcpy", "memset", "copy")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "index", "scatter", "gather", "cat")),
]


def _profiled(step, *, steps: int, device: torch.device, cpu: bool = False, shapes: bool = False):
    """Run ``step()`` ``steps`` times under the profiler (GPU kernels, and host ops with ``cpu``,
    with their input shapes with ``shapes``); returns (the profile, wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=shapes) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    return prof, wall


def _trace_events(prof) -> list[dict]:
    """The complete ("X") events of a profile's chrome trace (kernels, runtime calls, host ops)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return [e for e in json.load(open(f.name))["traceEvents"] if e.get("ph") == "X"]


def kernel_breakdown(step, *, steps: int, device: torch.device) -> dict:
    """Profile ``steps`` calls of ``step()`` and sum GPU kernel time by phase (PHASES).

    Returns {"step_ms": wall ms per step, "gpu_busy_ms": summed kernel ms per step, "phases":
    {phase: ms per step}, "top": the 25 costliest kernels [name, calls per step, ms per step],
    "kernels_per_step", "by_duration": {bucket: [kernels per step, ms per step]} (how much of the
    step small kernels take), "short_gaps_ms": idle ms per step in gaps under 20 us between
    consecutive kernels (the launch-to-launch cost a CUDA graph still pays per kernel),
    "short_kernels": the 15 most frequent kernels under 5 us [name, calls per step]}.
    Kernel sums can exceed wall time only where streams overlap (the offload side stream)."""
    prof, wall = _profiled(step, steps=steps, device=device)
    totals: dict[str, list] = {}
    spans = []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = totals.setdefault(evt.name, [0, 0.0])
        t[0] += 1
        t[1] += evt.time_range.elapsed_us() / 1000.0  # a kernel event spans its GPU run; us -> ms
        spans.append((evt.time_range.start, evt.time_range.end, evt.name))
    buckets = {"<5us": [0, 0.0], "5-20us": [0, 0.0], "20-100us": [0, 0.0], ">=100us": [0, 0.0]}
    short_names: dict[str, int] = {}
    short_gaps, busy_end = 0.0, None
    for start, end, name in sorted(spans):
        us = end - start
        b = buckets["<5us" if us < 5 else "5-20us" if us < 20 else "20-100us" if us < 100 else ">=100us"]
        b[0] += 1
        b[1] += us / 1000.0
        if us < 5:
            short_names[name] = short_names.get(name, 0) + 1
        if busy_end is not None and 0 < start - busy_end < 20:
            short_gaps += (start - busy_end) / 1000.0
        busy_end = end if busy_end is None else max(busy_end, end)
    phases: dict[str, float] = {}
    for name, (_, ms) in totals.items():
        low = name.lower()
        phase = next((p for p, keys in PHASES if any(k in low for k in keys)), "other")
        phases[phase] = phases.get(phase, 0.0) + ms / steps
    top = sorted(totals.items(), key=lambda kv: -kv[1][1])[:25]
    return {
        "step_ms": round(1000 * wall / steps, 1),
        "gpu_busy_ms": round(sum(ms for _, ms in totals.values()) / steps, 1),
        "phases": {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "top": [[name[:120], round(n / steps, 1), round(ms / steps, 2)] for name, (n, ms) in top],
        "kernels_per_step": round(len(spans) / steps, 1),
        "by_duration": {k: [round(n / steps, 1), round(ms / steps, 2)] for k, (n, ms) in buckets.items()},
        "short_gaps_ms": round(short_gaps / steps, 2),
        "short_kernels": [[name[:100], round(n / steps, 1)]
                          for name, n in sorted(short_names.items(), key=lambda kv: -kv[1])[:15]],
    }


def host_gaps(step, *, steps: int, device: torch.device, min_gap_us: float = 20.0) -> dict:
    """Where the GPU waits for the host: profile ``steps`` calls of ``step()`` (CPU + CUDA),
    merge all GPU activity (every stream), and charge each idle gap longer than ``min_gap_us``
    to the CPU ops that were running when the kernel after the gap was launched.

    Returns {"gap_ms": idle ms per step, "gaps_per_step", "by_op": [[outermost op, second,
    innermost op, ms per step, gaps per step], ...] (costliest first), "self_cpu": [[op, self CPU ms per step,
    calls per step], ...] (the 20 ops with the most own host time)}."""
    prof, _ = _profiled(step, steps=steps, device=device, cpu=True)
    events = _trace_events(prof)
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    gaps = []  # (idle us, the launch event of the kernel after the gap or None)
    busy_end = None
    for e in gpu:
        if busy_end is not None and e["ts"] - busy_end > min_gap_us:
            gaps.append((e["ts"] - busy_end, launches.get(e.get("args", {}).get("correlation"))))
        busy_end = max(busy_end or 0.0, e["ts"] + e["dur"])
    stacks = _op_stacks([e for e in events if e.get("cat") == "cpu_op"], [g[1] for g in gaps if g[1]])
    by_op: dict[tuple[str, str, str], list] = {}
    for gap, launch in gaps:
        slot = by_op.setdefault(stacks.get(id(launch), ("?", "", "?")), [0.0, 0])
        slot[0] += gap
        slot[1] += 1
    gap_total, n_gaps = sum(g for g, _ in gaps), len(gaps)
    self_cpu = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:20]
    return {
        "gap_ms": round(gap_total / 1000 / steps, 1),
        "gaps_per_step": round(n_gaps / steps, 1),
        "by_op": [[*names, round(ms / 1000 / steps, 2), round(n / steps, 1)]
                  for names, (ms, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:15]],
        "self_cpu": [[a.key[:80], round(a.self_cpu_time_total / 1000 / steps, 2), round(a.count / steps, 1)]
                     for a in self_cpu],
    }


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge [start, end) spans into sorted disjoint ones."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Total length where two disjoint sorted span lists overlap."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def comm_overlap(step, *, steps: int, device: torch.device) -> dict:
    """How much of the collectives' GPU time hides behind compute: profile ``steps`` calls of
    ``step()`` (every rank must call this: the step runs collectives) and split the GPU time
    into compute kernels, NCCL kernels, their overlap, NCCL alone (exposed) and idle.

    Returns ms per step: {"window", "compute", "nccl", "nccl_overlapped", "nccl_exposed", "idle"}."""
    prof, _ = _profiled(step, steps=steps, device=device)
    events = [e for e in _trace_events(prof) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not events:
        return {}
    spans = {"nccl": [], "compute": []}
    for e in events:
        spans["nccl" if "nccl" in e["name"].lower() else "compute"].append((e["ts"], e["ts"] + e["dur"]))
    nccl, compute = _union(spans["nccl"]), _union(spans["compute"])
    busy = sum(b - a for a, b in _union(spans["nccl"] + spans["compute"]))
    window = max(b for _, b in nccl + compute) - min(a for a, _ in nccl + compute)
    both = _overlap(nccl, compute)
    n_total = sum(b - a for a, b in nccl)
    ms = lambda us: round(us / 1000 / steps, 1)  # noqa: E731
    return {"window": ms(window), "compute": ms(sum(b - a for a, b in compute)), "nccl": ms(n_total),
            "nccl_overlapped": ms(both), "nccl_exposed": ms(n_total - both), "idle": ms(window - busy)}


def _enclosing(ops: list[dict], points: list[dict]) -> dict[int, list[dict]]:
    """For each trace event in ``points``: the CPU op events of its thread that enclose its start,
    outermost first, by one sweep per thread (ops on a thread nest)."""
    out: dict[int, list[dict]] = {}
    for tid in {p["tid"] for p in points}:
        mine = sorted((o for o in ops if o["tid"] == tid), key=lambda o: (o["ts"], -o["dur"]))
        stack: list[dict] = []
        i = 0
        for p in sorted((p for p in points if p["tid"] == tid), key=lambda p: p["ts"]):
            while i < len(mine) and mine[i]["ts"] <= p["ts"]:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < mine[i]["ts"]:
                    stack.pop()
                stack.append(mine[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < p["ts"]:
                stack.pop()
            out[id(p)] = list(stack)
    return out


def _op_stacks(ops: list[dict], points: list[dict]) -> dict[int, tuple[str, str, str]]:
    """For each trace event in ``points``: (outermost, second, innermost) name of the CPU ops of its
    thread that enclose its start."""
    out = {}
    for key, stack in _enclosing(ops, points).items():
        names = [o["name"][:80] for o in stack] or ["?"]
        out[key] = (names[0], names[1] if len(names) > 2 else "", names[-1])
    return out


def _kernels_by_op(events: list[dict], steps: int, top: int) -> list[list]:
    """GPU kernel time by (kernel, the innermost CPU op that launched it, that op's input shapes
    and strides), from a trace recorded with shapes: [[kernel, op, dims, strides, calls per step,
    ms per step], ...], costliest first. Tells e.g. which GEMM a cuBLAS kernel name is."""
    kernels = [e for e in events if e.get("cat") == "kernel"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    pairs = [(k, launches.get(k.get("args", {}).get("correlation"))) for k in kernels]
    stacks = _enclosing([e for e in events if e.get("cat") == "cpu_op"], [l for _, l in pairs if l])
    rows: dict[tuple, list] = {}
    for kernel, launch in pairs:
        op = (stacks.get(id(launch)) or [{}])[-1] if launch else {}
        args = op.get("args", {})
        key = (kernel["name"][:100], op.get("name", "?"), str(args.get("Input Dims", ""))[:160],
               str(args.get("Input Strides", ""))[:160])
        slot = rows.setdefault(key, [0, 0.0])
        slot[0] += 1
        slot[1] += kernel["dur"] / 1000.0
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]
    return [[*key, round(n / steps, 1), round(ms / steps, 3)] for key, (n, ms) in ranked]


def kernel_shapes(step, *, steps: int, device: torch.device, top: int = 40) -> list[list]:
    """Profile ``steps`` calls of ``step()`` with shapes recorded and attribute each GPU kernel to
    its launching op and that op's input shapes (``_kernels_by_op``). A replayed CUDA graph
    launches its kernels from no op: run it without GRAPH=1."""
    prof, _ = _profiled(step, steps=steps, device=device, cpu=True, shapes=True)
    return _kernels_by_op(_trace_events(prof), steps, top)


def memory_at_peak(step, *, device: torch.device, top: int = 20) -> dict:
    """What is allocated at the peak of one ``step()``: the CUDA allocator's event history of the
    call, replayed to find the moment of the largest total, and the live blocks at that moment
    grouped by the innermost frame in this repository (else the innermost Python frame).

    Returns {"peak_gib": the replayed peak, "before_gib": allocated when the step began,
    "at_peak": [[frame, MiB, blocks], ...] (largest first)}. A replayed CUDA graph allocates
    nothing (its memory was taken at capture), so under GRAPH=1 ``at_peak`` is empty."""
    root = str(Path(__file__).resolve().parents[1])
    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")  # C++ stacks broke compiled backward
    before = torch.cuda.memory_allocated(device)
    try:
        step()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][device.index or 0]
    live: dict[int, dict] = {}
    total = peak = 0
    peak_live: dict[int, dict] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, peak_live = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]

    def where(e: dict) -> str:
        frames = e.get("frames") or []
        mine = [f for f in frames if f["filename"].startswith(root)]
        f = (mine or [f for f in frames if f["filename"].endswith(".py")] or [{"filename": "?", "line": 0, "name": "?"}])[0]
        return f"{f['filename'].replace(root + '/', '')}:{f['line']} {f['name']}"

    groups: dict[str, list] = {}
    for e in peak_live.values():
        g = groups.setdefault(where(e), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    return {
        "peak_gib": round((before + peak) / 2**30, 3),
        "before_gib": round(before / 2**30, 3),
        "at_peak": [[k, round(v[0] / 2**20, 1), v[1]] for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def write_breakdown(path: str | None, step, *, steps: int, device: torch.device, label: str) -> None:
    """``kernel_breakdown`` and ``host_gaps`` (and with MEMTRACE=1 ``memory_at_peak``, with
    SHAPES=1 ``kernel_shapes``) appended as one JSON line (with ``label``) to ``path``; CUDA only."""
    if not path or device.type != "cuda":
        return
    row = {"commit": commit(), "label": label, **kernel_breakdown(step, steps=steps, device=device),
           "host": host_gaps(step, steps=steps, device=device)}
    if os.environ.get("MEMTRACE") == "1":
        row["memory"] = memory_at_peak(step, device=device)
    if os.environ.get("SHAPES") == "1":
        row["kernel_ops"] = kernel_shapes(step, steps=steps, device=device)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
