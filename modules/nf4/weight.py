"""``NF4Weight``: a frozen weight stored in 4-bit NF4 (about 0.516 bytes per parameter)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.kernels.nf4 import dequantize_nf4
from tunelab.modules.nf4.quantize import dynamic_code, nf4_code, quantize_nf4

__all__ = ["NF4Weight", "to_nf4"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NF4Weight(nn.Module):
    """A tensor quantized to NF4, with bitsandbytes' storage layout (see ``to_nf4``).

    It is an ``nn.Module`` so that ``.to(device)`` / ``.cuda()`` move its storage with the model
    that holds it; ``.to(dtype)`` / ``.half()`` leave it alone (the fp32 scales are stored as
    their int32 bit patterns for that reason: a model-wide cast must not round them).

    Buffers:
        codes: uint8 [ceil(n / 2)], two 4-bit level indices per byte, high nibble first.
        absmax_q: uint8 [ceil(n / block_size)], the 8-bit block scales.
        absmax_scale_bits: int32 [ceil(n_blocks / scaler_block_size)], fp32 bit patterns.
        absmax_offset_bits: int32 [1], the fp32 offset's bit pattern.
        code / absmax_code: only when the level tables differ from the standard NF4 / dynamic
            maps (a foreign checkpoint); otherwise shared cached tables are used.

    Args:
        codes, absmax_q: as above.
        absmax_scale: fp32 [ceil(n_blocks / scaler_block_size)].
        absmax_offset: fp32 scalar or [1].
        shape: the original shape.
        dtype: the original dtype (what ``dequantize()`` returns by default).
        block_size: weights per absmax (64).
        scaler_block_size: absmax values per scale (256).
        code: optional fp32 [16] NF4 levels (default: the standard table).
        absmax_code: optional fp32 [256] levels of the 8-bit scales (default: the dynamic map).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        absmax_q: torch.Tensor,
        absmax_scale: torch.Tensor,
        absmax_offset: torch.Tensor,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        block_size: int = 64,
        scaler_block_size: int = 256,
        *,
        code: torch.Tensor | None = None,
        absmax_code: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.block_size = block_size
        self.scaler_block_size = scaler_block_size
        n = self.shape.numel()
        n_blocks = -(-n // block_size)
        expected = {
            "codes": (codes, torch.uint8, (n + 1) // 2),
            "absmax_q": (absmax_q, torch.uint8, n_blocks),
            "absmax_scale": (absmax_scale, torch.float32, -(-n_blocks // scaler_block_size)),
            "absmax_offset": (absmax_offset, torch.float32, 1),
        }
        for name, (t, want_dtype, want_numel) in expected.items():
            if t.dtype != want_dtype or t.numel() != want_numel:
                raise ValueError(
                    f"NF4 {name} for shape {list(self.shape)} must be {want_dtype} with {want_numel} "
                    f"elements, got {t.dtype} with {t.numel()}"
                )
        self.register_buffer("codes", codes.reshape(-1).contiguous())
        self.register_buffer("absmax_q", absmax_q.reshape(-1).contiguous())
        self.register_buffer("absmax_scale_bits", absmax_scale.reshape(-1).contiguous().view(torch.int32))
        self.register_buffer("absmax_offset_bits", absmax_offset.reshape(1).contiguous().view(torch.int32))
        for name, table, size in (("code", code, 16), ("absmax_code", absmax_code, 256)):
            if table is not None and (table.dtype != torch.float32 or table.numel() != size):
                raise ValueError(f"NF4 {name} must be fp32 with {size} entries")
            self.register_buffer(name, None if table is None else table.reshape(-1).contiguous().view(torch.int32))

    # ------------------------------------------------------------------ views of the storage
    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def absmax_scale(self) -> torch.Tensor:
        return self.absmax_scale_bits.view(torch.float32)

    @property
    def absmax_offset(self) -> torch.Tensor:
        return self.absmax_offset_bits.view(torch.float32)

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(code, absmax_code)``: the fp32 NF4 levels [16] and scale levels [256]."""
        code = self.code.view(torch.float32) if self.code is not None else nf4_code(self.device)
        absmax_code = (
            self.absmax_code.view(torch.float32) if self.absmax_code is not None else dynamic_code(self.device)
        )
        return code, absmax_code

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes, 8-bit scales, fp32 scales and offset, own tables if any)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / max(self.numel(), 1)

    # ------------------------------------------------------------------ dequantization
    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense tensor (original shape) in ``dtype`` (default: the original dtype).

        Values are ``level * block_absmax`` computed in fp32 and rounded once to ``dtype``
        (bitsandbytes' ``dequantize_4bit`` gives the same numbers). No autograd.

        Args:
            dtype: output dtype.
            out: optional flat contiguous buffer of ``numel()`` elements of ``dtype`` to write
                into (its view of the original shape is returned).
        """
        code, absmax_code = self.levels()
        flat = dequantize_nf4(
            self.codes,
            self.absmax_q,
            self.absmax_scale,
            self.absmax_offset,
            code,
            absmax_code,
            numel=self.numel(),
            block_size=self.block_size,
            scaler_block_size=self.scaler_block_size,
            dtype=dtype or self.dtype,
            out=out,
        )
        return flat.view(self.shape)

    def extra_repr(self) -> str:
        return (
            f"shape={list(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
            f"scaler_block_size={self.scaler_block_size}, bytes_per_param={self.bytes_per_param:.4f}"
        )


def to_nf4(weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256) -> NF4Weight:
    """Quantize ``weight`` to NF4 on its own device (the input is not modified or kept).

    Byte-compatible with ``bitsandbytes.functional.quantize_4bit(weight, blocksize=64,
    quant_type="nf4", compress_statistics=True)`` on CPU: ``codes`` equals its packed output
    (flattened), ``absmax_q`` its ``quant_state.absmax``, ``absmax_scale`` its
    ``quant_state.state2.absmax`` and ``absmax_offset`` its ``quant_state.offset``.

    Args:
        weight: fp32, bf16 or fp16 tensor (any shape; linear weights are [out, in]).
        block_size: weights per absmax block (even; 64 as in QLoRA).
        scaler_block_size: absmax values per fp32 scale (256 as in QLoRA).

    Returns:
        An ``NF4Weight`` on ``weight.device`` that remembers the shape and dtype.
    """
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"to_nf4 needs an fp32, bf16 or fp16 tensor, got {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError("to_nf4 needs real values; the weight is on the meta device")
    codes, absmax_q, absmax_scale, absmax_offset = quantize_nf4(weight, block_size, scaler_block_size)
    return NF4Weight(
        codes, absmax_q, absmax_scale, absmax_offset, weight.shape, weight.dtype, block_size, scaler_block_size
    )


def nf4_bytes_per_param(numel: int, block_size: int = 64, scaler_block_size: int = 256) -> float:
    """Storage of an NF4 tensor with ``numel`` values, in bytes per value."""
    n_blocks = math.ceil(numel / block_size)
    total = math.ceil(numel / 2) + n_blocks + 4 * math.ceil(n_blocks / scaler_block_size) + 4
    return total / numel
