"""Does the fast path compute the same 8B step as the unfused one, within bf16 noise?

One LoRA step of the performance.md workload (Llama-3.1-8B shape, random weights, batch 2 x
2048, rank 16 / alpha 32 on all seven projections, fp32 adapters with non-zero B) three ways:

- ``fused``: the kernels on, layers compiled, fused chunked cross-entropy (the fast profile);
- ``reference``: the kernels off (``TUNELAB_KERNELS=reference``: the plain PyTorch modules,
  eager, full logits), also in bf16;
- ``truth``: the reference path on an fp32 copy of the same weights.

The line reports each bf16 path's relative error against the truth, for the loss and for all
adapter gradients together (relative L2), and ``ok``: the fused errors are at most twice the
reference's plus 1e-3 (the kernels' tests' "bf16 noise", tests/kernels/conftest.py). A real bug
(a wrong index, a missing term) is off by O(1).

    python bench/loss_agreement.py                  # on the GPU machine (~40 GiB fp32 weights)
    python bench/loss_agreement.py --shape tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tunelab.kernels import backend, loss_sum
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training.steps import wrap_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import TARGETS, device_name, emit, random_model  # noqa: E402


def step(model, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean token loss and all adapter gradients flattened into one fp32 vector."""
    model.zero_grad(set_to_none=True)
    hidden = model(tokens, return_hidden=True)
    loss = loss_sum(hidden, model.output_weight, labels) / labels.numel()
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in get_adapter_params(model).values()])
    return loss.item(), grads


def rel(a, b) -> float:
    if isinstance(a, float):
        return abs(a - b) / abs(b)
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None, help="also append the JSON line to this file")
    opts = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(opts.shape, device, torch.bfloat16)
    apply_lora(model, TARGETS, rank=16, alpha=32, adapter_dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(1)
    for p in get_adapter_params(model).values():  # B starts at zero: make every adapter term count
        p.data.normal_(0.0, 0.02, generator=gen)
    set_trainable_params(model)
    cpu_gen = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    tokens, labels = (torch.randint(0, vocab, (opts.batch, opts.seq), generator=cpu_gen).to(device) for _ in range(2))

    with backend("reference"):
        ref_loss, ref_grads = step(model, tokens, labels)
    wrap_layers(model, activation_checkpointing=False, compile_layers=device.type == "cuda")
    fused_loss, fused_grads = step(model, tokens, labels)
    torch._dynamo.reset()
    model.float()  # the same weights in fp32 (the compiled forwards were swapped in place: plain eager again)
    for layer in model.layers:
        del layer.forward
    with backend("reference"):
        true_loss, true_grads = step(model, tokens, labels)

    errors = {"fused_loss": rel(fused_loss, true_loss), "reference_loss": rel(ref_loss, true_loss),
              "fused_grads": rel(fused_grads, true_grads), "reference_grads": rel(ref_grads, true_grads)}
    ok = all(errors[f"fused_{k}"] <= 2 * errors[f"reference_{k}"] + 1e-3 for k in ("loss", "grads"))
    emit({
        "device": device_name(device),
        "torch": torch.__version__,
        "bench": "loss_agreement",
        "profile": "loss_agreement",
        "config": f"{opts.shape} bs{opts.batch} seq{opts.seq} lora r16 all-linear adapters=fp32 fused=compile+kernels",
        "tokens_per_s": None,
        "peak_gib": None,
        "loss": {"fused": round(fused_loss, 6), "reference": round(ref_loss, 6), "truth": round(true_loss, 6)},
        "rel_err": {k: float(f"{v:.3e}") for k, v in errors.items()},
        "ok": ok,
    }, opts.out)


if __name__ == "__main__":
    main()
