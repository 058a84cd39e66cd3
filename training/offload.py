"""Offload the checkpointed layer inputs to pinned CPU memory, overlapped with compute.

With activation checkpointing each decoder layer keeps only its input hidden states for the
backward ([b, s, dim]: 32 MiB per layer for an 8B model at 4,096 tokens, 1 GiB for 32 layers).
:class:`ActivationOffloader` is a ``saved_tensors_hooks`` pair put around each checkpointed
layer call, so it sees exactly those tensors (the activations saved inside the layer go to the
checkpoint's own, inner hooks). It copies each to a pinned host buffer on a side stream while
the next layers compute, and in backward brings it back: the layer being recomputed waits for
its own copy, and the copy of the layer before it (the next one backward needs) starts at once
on the side stream, so the transfer hides behind that layer's recompute. At ~50 GB/s each way
(H200 host link) a 32 MiB input moves in ~0.7 ms against several ms of layer compute.

Only floating tensors that require grad and are at least ``min_bytes`` are moved (the
activations); position ids, masks, the RoPE tables and other shared inputs stay where they
are, and so does layer 0's input under LoRA (the frozen embedding's output is not in the
autograd graph): 31 of 32 inputs move for an 8B model. On a CPU device
the "offload" is a copy to another CPU tensor (the same bookkeeping, tested in CI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["ActivationOffloader"]


@dataclass
class _Handle:
    host: torch.Tensor | None  # pinned CPU copy (None once consumed)
    device: torch.device
    index: int  # position in pack order within one forward
    copied: torch.cuda.Event | None = None  # device -> host copy done
    fetched: torch.Tensor | None = None  # prefetched device copy
    fetched_event: torch.cuda.Event | None = None


class ActivationOffloader:
    """Saved-tensor hooks that park large activations in pinned host memory.

    Use one instance per model; enter :meth:`hooks` around each checkpointed layer call
    (``training.steps.wrap_layers`` does this for ``offload_activations=True``).

    Args:
        min_bytes: tensors smaller than this stay on the device (copy overhead not worth it).
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self._stream: torch.cuda.Stream | None = None
        self._handles: list[_Handle | None] = []  # this forward's handles, in pack order
        self._free: dict[tuple, list[torch.Tensor]] = {}  # pinned buffers to reuse, by (shape, dtype)
        self.offloaded_bytes = 0  # of the last forward (for logs and tests)

    # ------------------------------------------------------------------ host buffers
    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        free = self._free.get((tuple(t.shape), t.dtype))
        if free:
            return free.pop()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)  # pinned: async copies

    def _release(self, host: torch.Tensor) -> None:
        self._free.setdefault((tuple(host.shape), host.dtype), []).append(host)

    # ------------------------------------------------------------------ hooks
    def _pack(self, t: torch.Tensor):
        if not (t.is_floating_point() and t.requires_grad and t.numel() * t.element_size() >= self.min_bytes):
            return t
        if all(h is None for h in self._handles):  # the previous backward consumed everything: new forward
            self._handles, self.offloaded_bytes = [], 0
        host = self._host_buffer(t)
        handle = _Handle(host=host, device=t.device, index=len(self._handles))
        if t.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(t.device)
            self._stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
                handle.copied = torch.cuda.Event()
                handle.copied.record()
            t.record_stream(self._stream)  # keep t's memory until the copy has read it
        else:
            host.copy_(t)
        self._handles.append(handle)
        self.offloaded_bytes += t.numel() * t.element_size()
        return handle

    def _fetch(self, handle: _Handle) -> None:
        """Start the host -> device copy of ``handle`` on the side stream."""
        if handle.fetched is not None or handle.device.type != "cuda":
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(handle.copied)
            handle.fetched = handle.host.to(handle.device, non_blocking=True)
            handle.fetched_event = torch.cuda.Event()
            handle.fetched_event.record()

    def _unpack(self, packed):
        if not isinstance(packed, _Handle):
            return packed
        handle = packed
        if handle.host is None:
            raise RuntimeError("an offloaded activation was unpacked twice (backward with retain_graph=True); "
                               "set offload_activations: false for this")
        if handle.device.type == "cuda":
            self._fetch(handle)
            current = torch.cuda.current_stream(handle.device)
            current.wait_event(handle.fetched_event)
            out = handle.fetched
            out.record_stream(current)  # allocated on the side stream, used on this one
            previous = handle.index - 1  # backward runs the layers in reverse: prefetch the next one
            if previous >= 0 and self._handles[previous] is not None:
                self._fetch(self._handles[previous])
        else:
            out = handle.host.clone()
        self._handles[handle.index] = None
        self._release(handle.host)  # its next copy is ordered after this one on the side stream
        handle.host = handle.fetched = None
        return out

    def hooks(self) -> saved_tensors_hooks:
        """The context to run one checkpointed layer call in."""
        return saved_tensors_hooks(self._pack, self._unpack)
