"""Replay a whole training step (forward, backward, optimizer) as one CUDA graph.

Why: with activation checkpointing an 8B LoRA step launches thousands of kernels from Python
(three passes over 32 layers, seven LoRA projections each, plus NF4 dequantizations for QLoRA),
and the GPU waits whenever the host falls behind. A captured graph replays every launch with
one call, so the step runs at the GPU's pace.

What a graphed step needs (checked on the first capture, not guessed): fixed tensor shapes
(``inputs`` are copied into static buffers before each replay), no host synchronisation inside
the step (no ``.item()``, no data-dependent shapes), a capturable optimizer
(``torch.optim.AdamW(..., capturable=True)``) whose lr is a tensor if a schedule changes it,
and no randomness (dropout) in the model: checkpointing's recompute must replay the forward
exactly. Gradients live in the graph's memory pool between replays; do not clear them between
steps (each replay's backward overwrites them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GraphedStep"]


class GraphedStep:
    """A training step captured once and replayed as a CUDA graph.

    Args:
        body: runs one step on the tensors of ``static_inputs`` (forward, backward, optimizer
            step; no gradient clearing) and returns a tensor (e.g. the detached loss) or a tuple
            of tensors, read after each replay.
        static_inputs: the step's device input tensors, by name; each call copies the new
            values in (same shapes and dtypes).
        zero_grad: clears the gradients (``optimizer.zero_grad``), run before warm-up steps and
            before the capture so the captured backward writes fresh gradient buffers.
        warmup: eager steps run on a side stream before capturing (lazy initialisation,
            compilation, autotuning and cuBLAS workspaces must happen outside the capture).
            These are real training steps: they update the weights like any other step.
    """

    def __init__(self, body: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
                 static_inputs: dict[str, torch.Tensor], zero_grad: Callable[[], None], *, warmup: int = 2):
        self.body, self.inputs, self.zero_grad = body, static_inputs, zero_grad
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.zero_grad()
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.body()

    def __call__(self, **inputs: torch.Tensor):
        """Copy ``inputs`` into the static buffers and run one step; returns ``body``'s outputs
        (the static tensors the graph writes: read or clone them before the next call)."""
        for name, value in inputs.items():
            self.inputs[name].copy_(value, non_blocking=True)
        if self.graph is None:  # the first call's values drive the warm-up steps and the capture
            self._capture()
        self.graph.replay()  # (capturing records the step without running it)
        return self.outputs
