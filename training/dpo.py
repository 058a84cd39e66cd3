"""The pieces of a preference-tuning (DPO, IPO, hinge, SimPO, ORPO, KTO) step that the
single-device and the FSDP recipe share: log-probs of the policy and of the reference, the
precomputed reference, per-pair (KTO: per-row) losses, and metrics reduced over every rank.

The reference is the policy model itself with its LoRA adapters switched off
(``disable_adapters``) under ``no_grad``: no second model in memory, and for QLoRA it is the
same NF4 base. A micro-batch of b pairs is ONE forward of 2b rows (chosen rows first,
``tunelab.data.preference_collate``). Each function takes the recipe's own typed config (any
object with a ``loss`` group of :class:`LossConfig`), like ``tunelab.training.spine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tunelab.data.kto import KTODataset, kto_collate
from tunelab.data.preference import preference_collate
from tunelab.errors import ConfigError
from tunelab.modules.loss import (
    REFERENCE_FREE,
    kto_loss,
    preference_loss,
    sequence_log_probs_from_hidden,
    whole_sequence_labels,
)
from tunelab.modules.peft import disable_adapters
from tunelab.training.checkpointing import ResumableSampler
from tunelab.training.process_group import all_gather_stack, all_reduce_sum
from tunelab.training.steps import plain_output_weight

__all__ = [
    "REWARD_KEYS",
    "LossConfig",
    "PairStats",
    "StepLosses",
    "WithReference",
    "DPOFields",
    "check_loss_settings",
    "eval_line",
    "evaluate",
    "make_preference_loader",
    "pair_losses",
    "policy_log_probs",
    "precompute_reference",
    "reference_log_probs",
]

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margins")


# ------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class LossConfig:
    """``type``: sigmoid (DPO) | ipo | hinge | simpo | orpo | kto (see ``tunelab.modules.loss.dpo``).
    ``label_smoothing`` is used by sigmoid and simpo, ``gamma`` (target margin) by simpo only;
    simpo and orpo use no reference model. kto trains on unpaired rows
    (``tunelab.data.kto_dataset``) and weighs them by ``desirable_weight`` /
    ``undesirable_weight`` (keys a config may leave out: 1.0)."""

    type: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"]
    beta: float
    label_smoothing: float
    gamma: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass(kw_only=True)
class DPOFields:
    """The keys the DPO recipes add to the shared ones (mixed into their ``RecipeConfig``)."""

    loss: LossConfig
    precompute_ref_log_probs: bool


def check_loss_settings(cfg) -> None:
    """DPO-only value ranges (the shared ones are ``spine.check_settings``'s).

    Args:
        cfg: the recipe config (``loss`` and ``precompute_ref_log_probs``).

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    loss = cfg.loss
    if not loss.beta > 0:
        raise ConfigError(f"loss.beta must be > 0, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.label_smoothing and loss.type in ("ipo", "hinge", "orpo", "kto"):
        raise ConfigError(f"loss.label_smoothing is not used by loss.type={loss.type}; set it to 0.0")
    if loss.gamma and loss.type != "simpo":
        raise ConfigError("loss.gamma (target margin) is only used by loss.type=simpo; set it to 0.0")
    if cfg.precompute_ref_log_probs and loss.type in REFERENCE_FREE:
        raise ConfigError(f"precompute_ref_log_probs: {loss.type} uses no reference model; set it to false")
    if cfg.precompute_ref_log_probs and loss.type == "kto":
        raise ConfigError("precompute_ref_log_probs: kto's KL rows pair each prompt with another row of its "
                          "micro-batch, so their reference cannot be computed ahead; set it to false")
    for key in ("desirable_weight", "undesirable_weight"):
        value = getattr(loss, key)
        if not value > 0:
            raise ConfigError(f"loss.{key} must be > 0, got {value}")
        if value != 1.0 and loss.type != "kto":
            raise ConfigError(f"loss.{key} is only used by loss.type=kto; leave it at 1.0")


# ------------------------------------------------------------------------------ log-probs
def policy_log_probs(model, batch: dict, device: torch.device, *, whole_chosen: bool = False):
    """Summed response log-probs and response token counts of one micro-batch.

    Args:
        model: the LoRA model (plain or FSDP-sharded).
        batch: ``preference_collate`` output (tokens, labels [2b, s], lengths [2b]).
        device: where the model runs.
        whole_chosen: also score the chosen rows' whole sequences (ORPO's SFT term), from the
            same forward.

    Returns:
        ``(log_probs fp32 [2b], num_tokens int64 [2b])``, the b chosen rows first; with
        ``whole_chosen`` a third item ``(log_probs [b], num_tokens [b])`` of the chosen rows'
        whole sequences (every token after the first).
    """
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    hidden = model(tokens, return_hidden=True)  # (2b, s, dim)
    # a plain (frozen) head lets the fused per-token loss skip the fp32 logits; a LoRA'd one is called
    head = dict(lm_head=model.logits_from_hidden, output_weight=plain_output_weight(model))
    response = sequence_log_probs_from_hidden(hidden, labels, **head)
    if not whole_chosen:
        return response
    b = tokens.shape[0] // 2
    whole = whole_sequence_labels(tokens[:b], batch["lengths"][:b].to(device))
    return (*response, sequence_log_probs_from_hidden(hidden[:b], whole, **head))


@torch.no_grad()
def reference_log_probs(model, batch: dict, device: torch.device) -> torch.Tensor:
    """[2b] log-probs under the base model: the same model with its adapters disabled.

    Args:
        model, batch, device: as :func:`policy_log_probs`.
    """
    with disable_adapters(model):
        return policy_log_probs(model, batch, device)[0]


class WithReference(Dataset):
    """A preference dataset whose items also carry their precomputed reference log-probs.

    Args:
        dataset: the preference dataset.
        ref: [len(dataset), 2] fp32 (chosen, rejected) per pair, in dataset order.
    """

    def __init__(self, dataset, ref: torch.Tensor):
        self.dataset, self.ref = dataset, ref

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        c, r = self.ref[i].tolist()
        return dict(self.dataset[i], ref_chosen_log_probs=c, ref_rejected_log_probs=r)


def make_preference_loader(dataset, batch_size: int, sampler, pad_id: int, drop_last: bool = True, *,
                           loss_type: str | None = None) -> DataLoader:
    """DataLoader of ``preference_collate`` batches (``kto_collate`` for a KTO dataset), each
    with ``num_tokens`` (real tokens of every row, for tokens/s).

    Args:
        dataset: preference pairs (optionally :class:`WithReference`) or KTO rows.
        batch_size: pairs (KTO: rows) per micro-batch.
        sampler: the order (``ResumableSampler`` / ``RankSampler``).
        pad_id: padding token id.
        drop_last: drop a last incomplete batch (training); False for evaluation.
        loss_type: the recipe's ``loss.type``, checked against the dataset's kind.

    Raises:
        ConfigError: a KTO dataset for a paired loss or the other way round.
    """
    unpaired = isinstance(dataset, KTODataset)
    if loss_type is not None and unpaired != (loss_type == "kto"):
        want = ("unpaired rows (dataset._component_: tunelab.data.kto_dataset)" if loss_type == "kto" else
                "preference pairs (dataset._component_: tunelab.data.preference_dataset)")
        raise ConfigError(f"loss.type={loss_type} trains on {want}; dataset {dataset.name} holds "
                          f"{'unpaired rows' if unpaired else 'pairs'}")

    def collate(items):
        # pairs: chosen and rejected rows; KTO: the rows and their mismatched KL rows
        batch = kto_collate(items, pad_id, dataset.max_seq_len) if unpaired else preference_collate(items, pad_id)
        batch["num_tokens"] = int(batch["lengths"].sum())
        return batch

    # a private generator: iter(DataLoader) otherwise draws a seed from the global RNG
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(0))


def precompute_reference(model, dataset, batch_size: int, pad_id: int, device: torch.device, *,
                         rank: int = 0, world_size: int = 1) -> WithReference:
    """Reference log-probs of every pair, before training starts.

    On one device the pairs are scored in dataset order. On ``world_size`` ranks, rank r
    scores pairs r, r + w, r + 2w, ...; the last slots wrap around to the first pairs so that
    every rank runs the same number of forwards (FSDP's all-gathers need every rank), and one
    all-gather then puts the whole table on every rank: each pair's value is there whichever
    rank the training sampler hands it to, in any epoch.

    Args:
        model: the LoRA model (its adapters are switched off for this).
        dataset: preference pairs.
        batch_size: pairs per forward.
        pad_id: padding token id.
        device: where the model runs.
        rank, world_size: this rank and the number of ranks (all ranks must call).

    Returns:
        ``dataset`` wrapped as :class:`WithReference`.
    """
    n = len(dataset)
    per_rank = -(-n // world_size)
    mine = [(rank + k * world_size) % n for k in range(per_rank)]
    loader = make_preference_loader(Subset(dataset, mine), batch_size, ResumableSampler(per_rank, 0, shuffle=False),
                                    pad_id, drop_last=False)
    parts = []
    for batch in loader:
        chosen, rejected = reference_log_probs(model, batch, device).chunk(2)  # [b] each
        parts.append(torch.stack([chosen, rejected], dim=1))  # (b, 2)
    table = all_gather_stack(torch.cat(parts))  # (w, per_rank, 2): row k of rank r is pair r + k*w
    return WithReference(dataset, table.transpose(0, 1).reshape(-1, 2)[:n].cpu())  # (n, 2)


# ------------------------------------------------------------------------------ losses + metrics
class StepLosses(NamedTuple):
    """What one micro-batch gives the step: per-pair (KTO: per-row) ``losses`` [b] and the
    detached rewards of the chosen (desirable) and the rejected (undesirable) responses; for
    paired losses both are [b] and aligned. ``kl``: KTO's KL estimate (a scalar), else None."""

    losses: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    kl: torch.Tensor | None = None


def pair_losses(model, batch: dict, cfg, device: torch.device) -> StepLosses:
    """Per-pair (KTO: per-row) losses and detached rewards of one micro-batch.

    The reference comes from the batch (``ref_log_probs``, precomputed) or is computed here
    with the adapters off; SimPO and ORPO use none.

    Args:
        model: the LoRA model.
        batch: ``preference_collate`` (``kto_collate``) output.
        cfg: the recipe config (its ``loss`` group).
        device: where the model runs.
    """
    if cfg.loss.type == "kto":
        return _kto_losses(model, batch, cfg, device)
    ref = None
    if cfg.loss.type not in REFERENCE_FREE:
        precomputed = batch.get("ref_log_probs")
        ref = precomputed.to(device) if precomputed is not None else reference_log_probs(model, batch, device)
    orpo = cfg.loss.type == "orpo"
    logps, n_tokens, *whole = policy_log_probs(model, batch, device, whole_chosen=orpo)
    return StepLosses(*preference_loss(cfg.loss.type, logps, ref, n_tokens, beta=cfg.loss.beta,
                                       label_smoothing=cfg.loss.label_smoothing, gamma=cfg.loss.gamma,
                                       chosen_sequences=whole[0] if orpo else None))


def _kto_losses(model, batch: dict, cfg, device: torch.device) -> StepLosses:
    """KTO as TRL computes it: the rows' completion log-probs under the policy (with grad);
    the mismatched KL rows under the policy and all 2b rows under the reference without; the
    KL estimate is the KL rows' mean log-ratio averaged over the ranks (TRL gathers each
    process's mean), clamped at 0 in the loss."""
    b = len(batch["desirable"])
    rows = {"tokens": batch["tokens"][:b], "labels": batch["labels"][:b]}
    kl_rows = {"tokens": batch["tokens"][b:], "labels": batch["labels"][b:]}
    logps = policy_log_probs(model, rows, device)[0]
    with torch.no_grad():
        policy_kl = policy_log_probs(model, kl_rows, device)[0]
        ref = reference_log_probs(model, batch, device)  # [2b]: rows, then KL rows
    kl = all_gather_stack((policy_kl - ref[b:]).mean().reshape(1)).mean()
    losses, chosen, rejected = kto_loss(logps, ref[:b], kl, batch["desirable"].to(device), beta=cfg.loss.beta,
                                        desirable_weight=cfg.loss.desirable_weight,
                                        undesirable_weight=cfg.loss.undesirable_weight)
    return StepLosses(losses, chosen, rejected, kl.clamp(min=0))


class PairStats:
    """Running sums over the pairs (KTO: rows) of one optimizer step (or one evaluation):
    loss, rewards, correctly ordered pairs, margins, KTO's KL and tokens.

    :meth:`reduce` adds the sums of all ranks in one collective and divides by the number of
    pairs of all ranks, so N ranks log exactly the means one device logs for the same global
    batch (not a mean of per-rank means). Sums stay on the device until then (no sync per
    micro-batch) and are fp64, so the order of summation does not show. Unpaired (KTO) steps
    log the desirable and undesirable rows' mean rewards, their difference as the margin (as
    TRL does) and the mean KL estimate, and no accuracy.

    Args:
        device: where the losses live.
    """

    def __init__(self, device: torch.device):
        self.device = device
        # loss, rows, chosen, n chosen, rejected, n rejected, correct, margins, n paired, kl, n kl, tokens
        self._sums = torch.zeros(12, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, out: StepLosses, num_tokens: int = 0) -> None:
        """Add one micro-batch: :func:`pair_losses`' output and its token count."""
        paired, n = out.kl is None, out.losses.numel()
        parts = [out.losses.double().sum(), n, out.chosen.double().sum(), out.chosen.numel(),
                 out.rejected.double().sum(), out.rejected.numel()]
        if paired:
            parts += [(out.chosen > out.rejected).double().sum(), (out.chosen - out.rejected).double().sum(), n, 0, 0]
        else:
            parts += [0, 0, 0, out.kl.double(), 1]
        parts.append(num_tokens)
        self._sums += torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device) for x in parts])

    def reduce(self, prefix: str = "") -> tuple[dict[str, float], int]:
        """``({prefix}loss, {prefix}rewards/..., [{prefix}kl]: means over all ranks' pairs}, total
        tokens)``. Collective when distributed: every rank calls it at the same point."""
        (loss, rows, chosen, n_chosen, rejected, n_rejected, correct, margins, n_paired, kl, n_kl,
         tokens) = all_reduce_sum(self._sums.tolist(), self.device)
        chosen, rejected = chosen / max(n_chosen, 1.0), rejected / max(n_rejected, 1.0)
        row = {f"{prefix}loss": loss / max(rows, 1.0), f"{prefix}rewards/chosen": chosen,
               f"{prefix}rewards/rejected": rejected}
        if n_kl:
            row.update({f"{prefix}rewards/margins": chosen - rejected, f"{prefix}kl": kl / n_kl})
        else:
            row.update({f"{prefix}rewards/accuracy": correct / max(n_paired, 1.0),
                        f"{prefix}rewards/margins": margins / max(n_paired, 1.0)})
        return row, int(tokens)


@torch.no_grad()
def evaluate(model, loader: DataLoader, cfg, device: torch.device) -> dict[str, float]:
    """Mean loss and reward statistics over every validation pair of every rank (dropout off).

    Args:
        model: the LoRA model.
        loader: this rank's validation batches (ranks must have equally many).
        cfg: the recipe config (its ``loss`` group).
        device: where the model runs.

    Returns:
        ``eval_loss`` and ``eval_rewards/{chosen,rejected,accuracy,margins}``.
    """
    model.eval()
    stats = PairStats(device)
    for batch in loader:
        stats.add(pair_losses(model, batch, cfg, device))
    model.train()
    return stats.reduce(prefix="eval_")[0]


def eval_line(step: int, row: dict[str, float]) -> str:
    """The line printed after an evaluation (``row`` from :func:`evaluate`)."""
    if "eval_kl" in row:  # KTO: unpaired rows have no accuracy
        return (f"step {step}: eval_loss={row['eval_loss']:.4f} eval_margin={row['eval_rewards/margins']:.3f} "
                f"eval_kl={row['eval_kl']:.4f}")
    return (f"step {step}: eval_loss={row['eval_loss']:.4f} eval_accuracy={row['eval_rewards/accuracy']:.3f} "
            f"eval_margin={row['eval_rewards/margins']:.3f}")
