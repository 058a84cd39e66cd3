"""NF4 quantization with bitsandbytes' exact arithmetic (QLoRA, Dettmers et al., 2023).

A weight is cut into blocks of 64 values; each block is scaled by its absolute maximum into
[-1, 1] and every value is replaced by the nearest of the 16 NF4 levels (4 bits, two per byte,
the even element in the high nibble). The fp32 block maxima are then "double quantized": their
mean is subtracted (one fp32 offset per tensor) and the centred values are quantized in blocks of
256 with the signed dynamic 8-bit map, keeping one fp32 scale per 256 blocks.

Every step reproduces ``bitsandbytes.functional.quantize_4bit(w, blocksize=64,
quant_type="nf4", compress_statistics=True)`` as it runs on CPU (bitsandbytes 0.50), so the packed
codes and the 8-bit scales are byte-identical: the 4-bit step multiplies by the reciprocal of
the block maximum (the short last block divides) and rounds with ``bucketize`` over the
midpoints of the levels; the 8-bit step looks the scaled value up in a 65536-entry table over
[-1, 1] (the scaled value is rounded to the nearest of 65536 grid points, then to the level
nearest that grid point), which is what bitsandbytes' CPU kernel does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["NF4_LEVELS", "nf4_code", "dynamic_code", "quantize_nf4", "quantize_absmax"]

# The 16 NF4 levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA
# paper, appendix E). They are stored as fp32 exactly like bitsandbytes' table.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_LUT_SIZE = 65536  # grid points over [-1, 1] for the 8-bit lookup
_CHUNK = 64 * 2**18  # weights quantized per pass (bounds the fp32/int32 temporaries)


def _build_dynamic_code() -> torch.Tensor:
    # Signed dynamic map (Dettmers, "8-bit approximations for parallelism", 2015): for each
    # decade 1e-6 .. 1e0 the midpoints of a linear grid on [0.1, 1] with 2**i intervals, both
    # signs, plus 0 and 1 -> 256 sorted levels. Same fp32 operations as bitsandbytes'
    # create_dynamic_map(signed=True), so the levels agree to the bit.
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (i - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _tables_cpu() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    code = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    dyn = _build_dynamic_code()
    nf4_mids = (code[:-1] + code[1:]) / 2
    dyn_mids = 0.5 * (dyn[:-1] + dyn[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    # level index of each grid point: the number of level midpoints strictly below it
    lut = torch.searchsorted(dyn_mids, grid, side="left").to(torch.uint8)
    return code, dyn, nf4_mids, lut


# Per-device copies of the tables, filled on first use (quantizing fills it for the weight's
# device). A plain dict, not functools.cache: torch.compile reads a dict entry as a constant,
# but traces into a cache wrapper down to the tables' construction and breaks the graph there.
_DEVICE_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tables = _DEVICE_TABLES.get(device)
    if tables is None:
        tables = _DEVICE_TABLES[device] = tuple(t.to(device) for t in _tables_cpu())
    return tables


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, fp32 [16] on ``device`` (cached: do not modify in place)."""
    return _tables(torch.device(device))[0]


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 signed dynamic 8-bit levels, fp32 [256] on ``device`` (cached: read only)."""
    return _tables(torch.device(device))[1]


def quantize_absmax(values: torch.Tensor, scaler_block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of fp32 ``values`` with the signed dynamic map.

    Args:
        values: fp32 [n] (the centred block maxima).
        scaler_block_size: values per scale.

    Returns:
        ``(q, scale)``: uint8 [n] level indices and fp32 [ceil(n / scaler_block_size)] block
        maxima, such that ``values ~= dynamic_code[q] * scale[block]``.
    """
    lut = _tables(values.device)[3]
    n = values.numel()
    n_blocks = -(-n // scaler_block_size)
    padded = F.pad(values.float(), (0, n_blocks * scaler_block_size - n))  # zeros leave |max| alone
    blocks = padded.view(n_blocks, scaler_block_size)
    scale = blocks.abs().amax(dim=1)  # [n_blocks]
    inv = 1.0 / scale
    normed = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    grid_index = (((normed + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int32)  # truncates: >= 0
    q = lut[torch.where(scale[:, None] > 0, grid_index, 0).long()]
    q = torch.where(scale[:, None] > 0, q, 0)  # an all-zero block stores index 0 (and scale 0)
    return q.reshape(-1)[:n].to(torch.uint8), scale


def quantize_nf4(
    weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a floating tensor to NF4 with double-quantized block scales.

    Args:
        weight: fp32 / bf16 / fp16 tensor of any shape (flattened in row-major order).
        block_size: weights per absmax block (64 = bitsandbytes' and QLoRA's choice).
        scaler_block_size: absmax values per fp32 scale (256).

    Returns:
        ``(codes, absmax_q, absmax_scale, absmax_offset)``: uint8 [ceil(n / 2)] packed codes,
        uint8 [ceil(n / block_size)] 8-bit block scales, fp32 [ceil(n_blocks / 256)] scales of
        the scales, fp32 [1] offset (the mean block maximum).
    """
    if block_size < 2 or block_size % 2 or scaler_block_size < 1:
        raise ValueError(f"block_size must be even and >= 2, scaler_block_size >= 1; got {block_size}, {scaler_block_size}")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    _, _, mids, _ = _tables(flat.device)
    codes, absmax = [], []
    # Chunks hold whole blocks (block_size is even), so blocks and nibble pairs never straddle.
    chunk_len = block_size * max(1, _CHUNK // block_size)
    for start in range(0, n, chunk_len):
        chunk = flat[start : start + chunk_len].float()
        full = chunk.numel() - chunk.numel() % block_size
        blocks = chunk[:full].view(-1, block_size)
        amax = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / amax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0).reshape(-1)
        if full < chunk.numel():  # the short last block of the tensor
            tail_max = chunk[full:].abs().max().clamp(min=1e-38)
            amax = torch.cat([amax, tail_max[None]])
            scaled = torch.cat([scaled, (chunk[full:] / tail_max).clamp(-1.0, 1.0)])
        if scaled.numel() % 2:  # odd length: the last low nibble encodes 0.0
            scaled = F.pad(scaled, (0, 1))
        q = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)  # nearest level
        codes.append((q[0::2] << 4) | q[1::2])
        absmax.append(amax)
        del chunk, blocks, scaled, q
    absmax = torch.cat(absmax)
    offset = absmax.mean()
    absmax_q, absmax_scale = quantize_absmax(absmax - offset, scaler_block_size)
    return torch.cat(codes), absmax_q, absmax_scale, offset.reshape(1)
