"""QLoRA's 4-bit NormalFloat (NF4) weights: storage, dequantization and linear layers.

    from tunelab.modules.nf4 import to_nf4, NF4Linear, NF4LoRALinear
    w4 = to_nf4(weight)                  # NF4Weight, ~0.516 bytes per parameter
    w = w4.dequantize()                  # dense again, original shape and dtype
    layer = NF4Linear(w4)                # frozen x @ W^T, backward keeps only the 4-bit weight
    qlora = NF4LoRALinear(w4, rank=16, alpha=32)   # LoRA adapters over the NF4 base

The storage is byte-compatible with bitsandbytes' ``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)`` (blocks of 64, double-quantized scales in blocks of 256).
"""

from tunelab.modules.nf4.experts import NF4ExpertWeights
from tunelab.modules.nf4.linear import NF4Linear, NF4LoRALinear, nf4_linear, quantize_linears_
from tunelab.modules.nf4.quantize import NF4_LEVELS, dynamic_code, nf4_code, quantize_absmax, quantize_nf4
from tunelab.modules.nf4.weight import NF4Weight, nf4_bytes_per_param, to_nf4

__all__ = [
    "NF4ExpertWeights",
    "NF4Linear",
    "NF4LoRALinear",
    "NF4Weight",
    "NF4_LEVELS",
    "dynamic_code",
    "nf4_bytes_per_param",
    "nf4_code",
    "nf4_linear",
    "quantize_absmax",
    "quantize_linears_",
    "quantize_nf4",
    "to_nf4",
]
