"""Fused kernels (Triton) with PyTorch references and one switch that picks between them.

Each op dispatches per call: the Triton kernel / fused autograd function for CUDA tensors when
``triton`` imports, the PyTorch reference otherwise. ``set_backend("reference")`` (or the
environment variable ``TUNELAB_KERNELS=reference``) turns the kernels off everywhere;
``set_backend("triton")`` forces them (CPU tensors then need ``TRITON_INTERPRET=1``).

    from tunelab.kernels import rms_norm, rope, swiglu, lora_linear, loss_sum
    y = rms_norm(x, weight, eps)                    # RMSNorm over the last dim
    q = rope(q, cos, sin)                           # q [b, h, s, hd], cos/sin [b, s, hd]
    a = swiglu(gate, up)                            # silu(gate) * up
    y = lora_linear(x, w0, a, b, scaling)           # x W0^T + s (x A^T) B^T, no dropout
    y = lora_swiglu(x, [wg, wu, wd], As, Bs, s)     # LoRA gate/up/down around silu(g) * u
    loss = loss_sum(hidden, model.output_weight, labels)   # fp32 SUM of token losses
"""

from tunelab.kernels._dispatch import (
    BACKENDS,
    HAS_TRITON,
    backend,
    get_backend,
    set_backend,
    use_triton,
)
from tunelab.kernels.fused_ce import (
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
    loss_sum,
)
from tunelab.kernels.lora import lora_linear, lora_linear_reference
from tunelab.kernels.lora_mlp import lora_swiglu, lora_swiglu_reference
from tunelab.kernels.rms_norm import rms_norm, rms_norm_reference
from tunelab.kernels.rope import rope, rope_reference
from tunelab.kernels.swiglu import gated_act, gated_act_reference, swiglu, swiglu_reference

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "backend",
    "fused_linear_cross_entropy",
    "get_backend",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_reference",
    "lora_swiglu",
    "lora_swiglu_reference",
    "loss_sum",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "set_backend",
    "gated_act",
    "gated_act_reference",
    "swiglu",
    "swiglu_reference",
    "use_triton",
]
