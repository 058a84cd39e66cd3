"""The trace arithmetic behind bench/_common.py's host_gaps and comm_overlap, on made-up
events (the profiling itself needs a GPU; these functions only read its trace)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _common import _op_stacks, _overlap, _union  # noqa: E402


def test_union_and_overlap_of_spans():
    compute = _union([(0, 10), (5, 15), (20, 30), (30, 31)])
    nccl = _union([(12, 25)])
    assert compute == [(0, 15), (20, 31)]
    assert _overlap(nccl, compute) == 3 + 5  # 12-15 and 20-25
    assert _overlap([], compute) == 0


def test_op_stacks_name_the_ops_enclosing_each_launch():
    ops = [dict(tid=1, ts=0, dur=100, name="step.forward"), dict(tid=1, ts=10, dur=20, name="CompiledFunction"),
           dict(tid=1, ts=12, dur=5, name="aten::mm"), dict(tid=1, ts=50, dur=10, name="aten::add"),
           dict(tid=2, ts=0, dur=5, name="autograd::engine")]
    points = [dict(tid=1, ts=13), dict(tid=1, ts=40), dict(tid=1, ts=55), dict(tid=2, ts=3), dict(tid=1, ts=200)]
    stacks = _op_stacks(ops, points)
    assert [stacks[id(p)] for p in points] == [
        ("step.forward", "CompiledFunction", "aten::mm"), ("step.forward", "", "step.forward"),
        ("step.forward", "", "aten::add"), ("autograd::engine", "", "autograd::engine"), ("?", "", "?")]


def test_kernels_by_op_name_the_launching_op_and_its_shapes():
    """Each kernel is charged to the innermost op around its launch (matched by correlation id),
    with that op's recorded input shapes; kernels of the same op and shapes add up."""
    from _common import _kernels_by_op

    mm = dict(cat="cpu_op", tid=1, ts=10, dur=20, name="aten::mm",
              args={"Input Dims": [[4096, 48], [48, 4096]], "Input Strides": [[48, 1], [4096, 1]]})
    events = [
        dict(cat="cpu_op", tid=1, ts=0, dur=100, name="autograd::engine"), mm,
        dict(cat="cuda_runtime", tid=1, ts=12, dur=2, name="cudaLaunchKernel", args={"correlation": 7}),
        dict(cat="cuda_runtime", tid=1, ts=50, dur=2, name="cudaLaunchKernel", args={"correlation": 8}),
        dict(cat="cuda_runtime", tid=1, ts=15, dur=2, name="cudaLaunchKernel", args={"correlation": 9}),
        dict(cat="kernel", name="nvjet_a", ts=100, dur=104.0, args={"correlation": 7}),
        dict(cat="kernel", name="nvjet_a", ts=300, dur=96.0, args={"correlation": 9}),
        dict(cat="kernel", name="fill", ts=200, dur=10.0, args={"correlation": 8}),
        dict(cat="kernel", name="orphan", ts=400, dur=5.0, args={}),
    ]
    rows = _kernels_by_op(events, steps=2, top=10)
    assert rows[0] == ["nvjet_a", "aten::mm", "[[4096, 48], [48, 4096]]", "[[48, 1], [4096, 1]]", 1.0, 0.1]
    assert rows[1][:2] == ["fill", "autograd::engine"] and rows[2][:2] == ["orphan", "?"]
