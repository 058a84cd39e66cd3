"""MXFP4 expert weights, as gpt-oss checkpoints on the Hub store them.

gpt-oss's ``config.json`` says ``quantization_config: {quant_method: mxfp4, ...}`` and each MoE
layer's expert projections are stored as two tensors instead of one:

- ``model.layers.{i}.mlp.experts.{gate_up,down}_proj_blocks``: uint8 [E, out, in / 32, 16],
  two FP4 (e2m1) codes per byte, the low nibble first: a block of 32 values of one output row;
- ``..._scales``: uint8 [E, out, in / 32], one power-of-two scale per block, as an e8m0
  exponent with bias 127.

tunelab dequantizes them on load (to the run's dtype; with ``quantize: nf4`` the dequantized
experts are then stored as NF4, one expert at a time) and writes merged exports dense (bf16):
training changes every expert weight, so the MXFP4 codes of the source no longer describe it.
The dequantized stack is transposed to the layout of a dense gpt-oss checkpoint
(``gate_up_proj`` [E, in, out], input-major), the one ``modules.moe.BiasedExperts`` holds.
"""

from __future__ import annotations

import torch

from tunelab.errors import CheckpointError

__all__ = ["FP4_E2M1", "BLOCK", "is_mxfp4", "mxfp4_part", "dense_shape", "dequantize_mxfp4", "expert_tensor_from_mxfp4"]

# The 16 values of an e2m1 code: sign bit 3, then exponent (2 bits) and mantissa (1 bit).
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values sharing one scale
_SUFFIXES = ("_blocks", "_scales")


def is_mxfp4(config: dict) -> bool:
    """True when config.json says the checkpoint's experts are MXFP4 (gpt-oss on the Hub)."""
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def mxfp4_part(hf_name: str) -> tuple[str, str] | None:
    """``...experts.down_proj_blocks`` -> (``...experts.down_proj``, ``blocks``); None for a
    name that is not half of an MXFP4 pair."""
    for suffix in _SUFFIXES:
        if hf_name.endswith(suffix):
            return hf_name.removesuffix(suffix), suffix[1:]
    return None


def dense_shape(blocks_shape) -> tuple[int, ...]:
    """The dense [E, in, out] shape an MXFP4 blocks tensor [E, out, in / 32, 16] stands for (a
    malformed one as it is, so a shape check against the model reports it)."""
    shape = tuple(blocks_shape)
    return (shape[0], shape[2] * shape[3] * 2, shape[1]) if len(shape) == 4 else shape


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 codes and scales -> values, row-major as stored.

    Args:
        blocks: uint8 [..., rows, G, 16]: 32 FP4 codes per (row, group), low nibble first.
        scales: uint8 [..., rows, G]: the exponent of each group's scale, biased by 127.
        dtype: the result's dtype (every FP4 value times a power of two is exact in bf16
            unless the exponent leaves bf16's range).

    Returns:
        [..., rows, G * 32] in ``dtype``.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 needs uint8 blocks [..., G, 16] and uint8 scales [..., G]; got blocks "
                         f"{blocks.dtype} {list(blocks.shape)} and scales {scales.dtype} {list(scales.shape)}")
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # [..., G, 16] each
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]: low nibble, high nibble, ...
    exponent = scales.to(torch.int32) - 127
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def expert_tensor_from_mxfp4(pair: dict[str, torch.Tensor], hf_name: str, dtype: torch.dtype, where) -> torch.Tensor:
    """A stacked expert tensor in the dense checkpoint layout [E, in, out] from its MXFP4
    ``{"blocks": ..., "scales": ...}`` pair (one expert at a time, so the float32 working copy
    stays one expert's size).

    Raises:
        CheckpointError: the two tensors do not fit together.
    """
    blocks, scales = pair["blocks"], pair["scales"]
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"{where}: {hf_name}_blocks {list(blocks.shape)} and _scales {list(scales.shape)} are "
                              "not an MXFP4 pair ([E, out, G, 16] and [E, out, G]); re-download the checkpoint")
    try:
        return torch.stack([dequantize_mxfp4(b, s, dtype).t() for b, s in zip(blocks, scales)]).contiguous()
    except ValueError as e:
        raise CheckpointError(f"{where}: {hf_name}: {e}; re-download the checkpoint") from None
