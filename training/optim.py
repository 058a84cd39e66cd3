"""Optimizers for full fine-tuning: AdamW whose states fit, and the optimizer step inside backward.

Full fine-tuning of an 8B model in bf16 holds 16 GB of weights; plain AdamW adds 32 GB of fp32
moments and 16 GB of gradients. Two things here bring that down, both plain PyTorch:

* :class:`AdamWBF16` stores the moments in the parameter's dtype (bf16: 2 x 2 bytes per
  weight) and computes every update in fp32. A bf16 weight cannot take an update much smaller
  than itself (bf16 keeps 8 bits of mantissa: w + 1e-4 * w rounds back to w), so the new
  weight (and each moment) is rounded *stochastically* to bf16: up or down with the
  probabilities that make the rounding unbiased, so small updates accumulate in expectation
  instead of vanishing. fp32 parameters are updated exactly as ``torch.optim.AdamW`` does.
* :class:`OptimizerInBackward` steps each parameter as soon as its gradient is complete in
  backward (``register_post_accumulate_grad_hook``) and frees that gradient, so at most a few
  gradients exist at once instead of a whole model's.

The rounding noise comes from a generator seeded by (seed, step, parameter index), not from
the global RNG: dropout masks are unchanged by it and a resumed run draws the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from tunelab.errors import ConfigError, TunelabError

__all__ = ["AdamWBF16", "NonFiniteGradientError", "OptimizerInBackward", "stochastic_round"]


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to ``dtype`` stochastically: to one of the two nearest values, the
    nearer one more often, so that the expected result is ``x``. Only bf16 is rounded this
    way (its values are fp32 values with the low 16 bits zero: add uniform noise to those bits,
    then cut them); other dtypes are a plain cast.

    Args:
        x: fp32 values.
        dtype: the target dtype.
        generator: the noise's generator (on ``x``'s device).
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 = 0xFFFF0000
    # a value the noise carried past the largest finite bf16 (or a nan/inf) keeps its plain cast
    return torch.where(torch.isfinite(rounded), rounded, x).to(dtype)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as ``torch.optim.AdamW``) whose
    moments are stored in the parameter's dtype and whose bf16 results are rounded
    stochastically (module docstring).

    Args:
        params: the parameters (or parameter groups).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        seed: seeds the rounding noise (with the step and the parameter's index).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, seed: int = 0):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWBF16: lr, eps, weight_decay >= 0 and betas in [0, 1) (got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self._reindex()

    def _reindex(self) -> None:
        # each parameter's group (load_state_dict replaces the group dicts) and its index (the noise seed)
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._group = {id(p): g for g in self.param_groups for p in g["params"]}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._reindex()

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient (what :class:`OptimizerInBackward` calls)."""
        group = self._group[id(p)]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = int(state["step"])
        # every operation is elementwise: an FSDP shard (DTensor) is updated through its local part
        param, m, v, grad = (_local(t) for t in (p, state["exp_avg"], state["exp_avg_sq"], p.grad))
        # torch.optim.AdamW's single-tensor update, operation for operation, in fp32 (for an fp32
        # parameter .float() is the tensor itself: updated in place, as AdamW does)
        grad = grad.float()
        weight = param.float().mul_(1 - lr * wd)
        exp_avg = m.float().lerp_(grad, 1 - beta1)  # beta1 m + (1 - beta1) g
        exp_avg_sq = v.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        gen = None
        if p.dtype == torch.bfloat16:
            gen = torch.Generator(device=param.device)
            gen.manual_seed((self.seed * 1_000_003 + step) * 1_000_033 + self._index[id(p)])
        for target, value in ((param, weight), (m, exp_avg), (v, exp_avg_sq)):
            target.copy_(stochastic_round(value, target.dtype, gen))
        self._opt_called = True  # what torch's lr schedulers look for: a step was taken


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class NonFiniteGradientError(TunelabError):
    """A parameter's gradient holds nan/inf; its update was not applied."""


class OptimizerInBackward:
    """Step each parameter inside backward, as soon as its gradient is accumulated, and free the
    gradient at once.

    Consequences a recipe must respect (``full_finetune_single_device`` checks them):
    gradients never coexist, so there is no gradient accumulation over micro-batches and no
    clipping by the global norm; the global norm is still measured (each parameter adds its
    squared norm before its update) and logged. A non-finite gradient raises
    :class:`NonFiniteGradientError` before that parameter's update is applied; parameters
    whose gradients came earlier in the same backward are already updated, so the run must
    stop without saving (the last complete checkpoint is intact).

    Args:
        optimizer: an optimizer with ``step_param(p)`` (:class:`AdamWBF16`).
        params: the parameters to step (each gets a hook).

    Raises:
        ConfigError: the optimizer cannot step one parameter at a time.
    """

    def __init__(self, optimizer, params: list[torch.Tensor]):
        if not hasattr(optimizer, "step_param"):
            raise ConfigError(f"optimizer_in_backward: {type(optimizer).__name__} cannot step one parameter at a "
                              "time; use optimizer._component_: tunelab.training.optim.AdamWBF16 or "
                              "optimizer_in_backward: false")
        self.optimizer = optimizer
        self._square = torch.zeros((), dtype=torch.float64)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.Tensor) -> None:
        square = p.grad.detach().float().square().sum()
        if not torch.isfinite(square):  # one sync per parameter: the price of checking before its update
            raise NonFiniteGradientError(f"a gradient of shape {list(p.shape)} holds nan/inf")
        self._square = self._square.to(square.device) + square.double()
        self.optimizer.step_param(p)
        p.grad = None

    def grad_norm(self) -> float:
        """The global gradient norm of the step just taken (and restart the sum)."""
        value, self._square = math.sqrt(float(self._square)), torch.zeros((), dtype=torch.float64)
        return value

    def remove(self) -> None:
        """Take the hooks off (the parameters step normally again)."""
        for h in self._handles:
            h.remove()
