"""Offload checkpointed activations to pinned CPU memory, overlapped with compute.

With activation checkpointing each decoder layer keeps only its input hidden states for the
backward ([b, s, dim]: 32 MiB per layer for an 8B model at 4,096 tokens, 1 GiB for 32 layers).
:class:`ActivationOffloader` is a ``saved_tensors_hooks`` pair put around each checkpointed
layer call, so it sees exactly those tensors (the activations saved inside the layer go to the
checkpoint's own, inner hooks). It copies each to a pinned host buffer on a side stream while
the next layers compute, and in backward brings it back before its layer is recomputed.

It also keeps the layer's *kept regions* (``modules.recompute.kept``: attention's RoPE + SDPA):
their saved tensors (q, k, v, the attention output; 80 MiB per 8B layer) are offloaded the
same way, and the attention output is handed back to the recompute, which then skips the
q/k/v projections, RoPE and the attention kernel. Fetch order in backward, per layer: its input
and attention output arrive before the layer's recompute starts; its q/k/v start coming back
when the recompute starts (needed only after the MLP's backward); the previous layer's input and
attention output start when this layer's attention backward begins (past its memory peak). At
~50 GB/s each way (H200 host link) a layer's 112 MiB move in ~2.3 ms.

At long context the kept regions no longer pay: q, k, v and the attention output are ~2.5x a
layer's input, and host memory is the other budget (an 8B model's bf16 layer inputs alone are
256 KiB per token, ~122 GiB at 500k tokens). ``keep_regions=False`` offloads the layer inputs
only (attention is recomputed as under plain checkpointing), and ``max_host_bytes`` caps the
pinned copies of one forward: once the next tensor would pass it, the remaining layers keep
their inputs on the device. The first layers go to the host, the last ones stay, which is
also the order backward wants them back in (the kept ones are used first and freed while the
host copies of the earlier layers come back).

Only floating tensors that require grad and are at least ``min_bytes`` are moved (the
activations); position ids, masks, the RoPE tables and other shared inputs stay where they
are, and so does layer 0's input under LoRA (the frozen embedding's output is not in the
autograd graph). On a CPU device the "offload" is a copy to another CPU tensor (the same
bookkeeping, tested in CI).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["ActivationOffloader"]


@dataclass(eq=False)
class _Handle:
    host: torch.Tensor | None  # pinned CPU copy (None once every use is done)
    device: torch.device
    group: int  # the layer call it was packed in (index into the offloader's groups)
    kept: bool  # saved by a kept region (needed only once backward reaches that region)
    early: bool  # needed when its layer's recompute starts (the layer input, a replayed output)
    uses: int = 1  # unpacks and replays still to come
    copied: torch.cuda.Event | None = None  # device -> host copy done
    fetched: torch.Tensor | None = None  # prefetched device copy
    fetched_event: torch.cuda.Event | None = None


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _layout(t: torch.Tensor) -> tuple:
    """What makes two host buffers interchangeable."""
    return (tuple(t.shape), t.stride(), t.dtype)


class ActivationOffloader:
    """Saved-tensor hooks that park large activations in pinned host memory.

    Use one instance per model; enter :meth:`hooks` around each checkpointed layer call and
    pass :meth:`keeper` to the call's forward and recompute (``training.steps.wrap_layers`` does
    both for ``offload_activations=True``).

    Args:
        min_bytes: tensors smaller than this stay on the device (copy overhead not worth it).
        keep_regions: also keep the layers' kept regions (attention) in host memory, so the
            rerun skips them; False: offload the layer inputs only.
        max_host_bytes: at most this many bytes of pinned copies per forward (None: no cap);
            tensors past it stay on the device.
    """

    def __init__(self, min_bytes: int = 1 << 20, keep_regions: bool = True, max_host_bytes: int | None = None):
        self.min_bytes = min_bytes
        self.keep_regions = keep_regions
        self.max_host_bytes = max_host_bytes
        self._stream: torch.cuda.Stream | None = None
        self._groups: list[list[_Handle]] = []  # this forward's handles, one list per layer call
        self._seen: dict[tuple, tuple[weakref.ref, _Handle]] = {}  # the current layer call's, by _key
        self._live = 0  # handles with uses left
        self._free: dict[tuple, list[torch.Tensor]] = {}  # pinned buffers to reuse, by (shape, dtype)
        self.offloaded_bytes = 0  # of the last forward (for logs and tests)

    # ------------------------------------------------------------------ host buffers
    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        # Same strides as t when t is dense (q, k, v and SDPA's output are transposed views):
        # each way is then one memcpy, not a gather kernel into a contiguous temporary first.
        # Pinned: async copies.
        free = self._free.get(_layout(torch.empty_like(t, device="meta")))
        if free:
            return free.pop()
        return torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)

    def _release(self, host: torch.Tensor) -> None:
        self._free.setdefault(_layout(host), []).append(host)

    # ------------------------------------------------------------------ device -> host
    def _moves(self, t: torch.Tensor) -> bool:
        # (not empty: torch 2.11's checkpoint saves an empty tensor that requires grad)
        nbytes = t.numel() * t.element_size()
        fits = self.max_host_bytes is None or self.offloaded_bytes + nbytes <= self.max_host_bytes
        return t.is_floating_point() and t.requires_grad and nbytes > 0 and nbytes >= self.min_bytes and fits

    def _offload(self, t: torch.Tensor, *, kept: bool, early: bool) -> _Handle:
        host = self._host_buffer(t)
        handle = _Handle(host=host, device=t.device, group=len(self._groups) - 1, kept=kept, early=early)
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
        self._groups[-1].append(handle)
        self._live += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        return handle

    def _pack_once(self, t: torch.Tensor, *, kept: bool, early: bool) -> _Handle:
        """``t`` offloaded, or the handle it already has in this layer call (saved twice: SDPA
        saves its output, which the kept region also returns). A key match counts only while
        the first tensor is alive: then no other tensor can have taken its memory."""
        key = _key(t)
        ref, handle = self._seen.get(key, (None, None))
        if handle is not None and ref() is not None and handle.uses > 0:
            handle.uses += 1
            handle.early |= early
            return handle
        handle = self._offload(t, kept=kept, early=early)
        self._seen[key] = (weakref.ref(t), handle)
        return handle

    def _pack(self, t: torch.Tensor):
        return self._pack_once(t, kept=False, early=True) if self._moves(t) else t

    # ------------------------------------------------------------------ host -> device
    def _fetch(self, handle: _Handle) -> None:
        """Start the host -> device copy of ``handle`` on the side stream."""
        if handle.fetched is not None or handle.host is None or handle.device.type != "cuda":
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(handle.copied)
            handle.fetched = handle.host.to(handle.device, non_blocking=True)
            handle.fetched_event = torch.cuda.Event()
            handle.fetched_event.record()

    def _fetch_group(self, group: int, early_only: bool = False) -> None:
        if 0 <= group < len(self._groups):
            for handle in self._groups[group]:
                if handle.early or not early_only:
                    self._fetch(handle)

    def _take(self, handle: _Handle, *, unpack: bool) -> torch.Tensor:
        """``handle``'s tensor back on its device, for one of its uses (an unpack or a replay)."""
        if handle.uses <= 0:
            raise RuntimeError("an offloaded activation was unpacked twice (backward with retain_graph=True); "
                               "set offload_activations: false for this")
        self._fetch_group(handle.group)  # the rest of this layer is needed during its backward
        if unpack and (handle.kept or not any(h.kept for h in self._groups[handle.group])):
            # backward has reached this layer's last part: bring what the previous layer's
            # recompute needs first
            self._fetch_group(handle.group - 1, early_only=True)
        if handle.device.type == "cuda":
            current = torch.cuda.current_stream(handle.device)
            current.wait_event(handle.fetched_event)
            out = handle.fetched
            out.record_stream(current)  # allocated on the side stream, used on this one
        else:
            out = handle.host.clone()
        handle.uses -= 1
        if handle.uses == 0:
            self._live -= 1
            self._release(handle.host)  # its next copy is ordered after this one on the side stream
            handle.host = handle.fetched = None
        return out

    def _unpack(self, packed):
        return self._take(packed, unpack=True) if isinstance(packed, _Handle) else packed

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """The context to run one checkpointed layer call in (packs its inputs)."""
        if self._live == 0:  # the previous backward consumed everything: a new forward
            self._groups, self.offloaded_bytes = [], 0
        self._groups.append([])
        self._seen = {}
        try:
            with saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._seen = {}

    def keeper(self) -> _Keeper:
        """A fresh store for one checkpointed call's kept regions (``modules.recompute.Keeper``)."""
        return _Keeper(self)


class _Keeper:
    """One checkpointed call's kept regions: their saved tensors and outputs, via the offloader."""

    def __init__(self, offloader: ActivationOffloader):
        self._offloader = offloader
        self._outputs: list[tuple[_Handle | torch.Tensor, bool]] = []
        self._replayed = 0

    def run(self, fn, *args) -> torch.Tensor:
        off = self._offloader

        def pack(t: torch.Tensor):
            return off._pack_once(t, kept=True, early=False) if off._moves(t) else t

        with saved_tensors_hooks(pack, off._unpack):
            out = fn(*args)
        # the output goes back to the recompute: one copy if the region saved it too (SDPA does)
        token = (off._pack_once(out.detach(), kept=True, early=True)
                 if out.numel() * out.element_size() >= off.min_bytes else out.detach())
        self._outputs.append((token, out.requires_grad))
        return out

    def replay(self) -> torch.Tensor:
        token, requires_grad = self._outputs[self._replayed]
        self._replayed += 1
        out = self._offloader._take(token, unpack=False) if isinstance(token, _Handle) else token
        # as in the forward: what the rerun saves downstream depends on it (a frozen linear
        # saves its input only when that input requires grad)
        return out.detach().requires_grad_(requires_grad)
