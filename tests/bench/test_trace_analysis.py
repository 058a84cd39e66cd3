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
