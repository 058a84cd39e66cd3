"""Replay training work as CUDA graphs: one launch instead of thousands from Python.

Why: with activation checkpointing an 8B LoRA step launches thousands of kernels from Python
(three passes over 32 layers, seven LoRA projections each, plus NF4 dequantizations for QLoRA),
and the GPU waits whenever the host falls behind: the compiled 8B QLoRA step on an H200 spent
~370 ms in kernels but ~410-530 ms per step (bench/results/breakdown.jsonl). A captured graph
replays every launch with one call, so the step runs at the GPU's pace.

What a graphed step needs: fixed tensor shapes (the inputs are copied into static buffers
before each replay; the recipe pads rows to ``max_seq_len``), no host synchronisation inside
(no ``.item()``, no data-dependent shapes), no randomness (dropout: checkpointing's recompute
must replay the forward exactly), and gradients that stay where they are between replays
(cleared in place, never set to None).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GraphedStep", "MicroBatchGraph"]


class GraphedStep:
    """A piece of training work captured once and replayed as a CUDA graph.

    Args:
        body: the work, on the tensors of ``static_inputs``; returns a tensor (or a tuple of
            tensors) read after each replay.
        static_inputs: the device input tensors ``body`` reads, by name; each call copies the
            new values in (same shapes and dtypes).
        reset: run before each warm-up and before the capture (e.g. clear the gradients the
            warm-up accumulated).
        warmup: eager runs on a side stream before capturing: lazy initialisation,
            compilation, autotuning and cuBLAS workspaces must happen outside the capture.
    """

    def __init__(self, body: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
                 static_inputs: dict[str, torch.Tensor], reset: Callable[[], None], *, warmup: int = 2):
        self.body, self.inputs, self.reset = body, static_inputs, reset
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.reset()
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.body()

    def __call__(self, **inputs: torch.Tensor):
        """Copy ``inputs`` into the static buffers and run the work once; returns ``body``'s
        outputs (static tensors the next call overwrites: read or clone them first)."""
        for name, value in inputs.items():
            self.inputs[name].copy_(value, non_blocking=True)
        if self.graph is None:  # the first call's values drive the warm-up and the capture
            self._capture()
        self.graph.replay()  # (capturing records the work without running it)
        return self.outputs


class MicroBatchGraph:
    """Forward + backward of one micro-batch (gradients of ``loss / n_labels`` accumulated into
    the parameters' ``.grad``), captured on the first call and replayed for every later batch
    of the same shapes; a batch of other shapes runs ``fallback`` (with a one-time notice).

    The first call must come at the start of an optimizer step (gradients zero or None): its
    warm-up runs are undone by clearing the gradients. Clear them in place afterwards
    (``optimizer.zero_grad(set_to_none=False)``): the graph writes to those buffers.

    Args:
        loss_fn: ``batch (tensors on device) -> summed token loss`` (a 0-dim tensor).
        params: the trainable parameters.
        device: the CUDA device.
        fallback: ``(batch, n_labels) -> summed loss``, the same work done eagerly.
    """

    def __init__(self, loss_fn: Callable[[dict], torch.Tensor], params: list[torch.nn.Parameter],
                 device: torch.device, fallback: Callable[[dict, int], torch.Tensor]):
        self.loss_fn, self.params, self.device, self.fallback = loss_fn, params, device, fallback
        self.inv_labels = torch.ones((), device=device)  # 1 / label tokens of the optimizer step
        self.step: GraphedStep | None = None
        self.shapes: dict | None = None
        self.noticed = False
        self._grad_ptrs: dict[int, int] = {}

    def _reset_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        self._grad_ptrs = {id(p): p.grad.data_ptr() for p in self.params}  # what the capture writes to

    def __call__(self, batch: dict, n_labels: int) -> torch.Tensor:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        if self.step is None:
            static = {k: v.to(self.device, copy=True) for k, v in tensors.items()}
            self.shapes = shapes

            def body() -> torch.Tensor:
                loss = self.loss_fn(static)
                (loss * self.inv_labels).backward()
                return loss.detach()

            self.step = GraphedStep(body, static, self._reset_grads)
        elif shapes != self.shapes:
            if not self.noticed:
                print(f"notice: cuda_graph: a batch of shapes {shapes} differs from the captured {self.shapes}; "
                      "such batches run eagerly", flush=True)
                self.noticed = True
            return self.fallback(batch, n_labels)
        self.inv_labels.fill_(1.0 / n_labels)
        first = self.step.graph is None
        loss = self.step(**tensors).clone()
        if first:
            moved = [p for p in self.params if p.grad is None or p.grad.data_ptr() != self._grad_ptrs[id(p)]]
            if moved:  # the graph would keep writing into buffers the optimizer no longer reads
                raise RuntimeError("cuda_graph: the captured backward did not accumulate the gradients in place; "
                                   "set cuda_graph: false")
        return loss
