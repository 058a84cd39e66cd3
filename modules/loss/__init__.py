"""Training losses that research code can import alone (no training/recipes imports).

    from tunelab.modules.loss import cross_entropy_sum, sequence_log_probs, dpo_loss
    loss = cross_entropy_sum(model(tokens, return_hidden=True), labels, model.logits_from_hidden)
    logp, n = sequence_log_probs(model(tokens), labels)         # [2b] each, chosen rows first
    losses, r_chosen, r_rejected = preference_loss("sigmoid", logp, ref_logp, n, beta=0.1)
"""

from tunelab.modules.loss.cross_entropy import IGNORE_INDEX, cross_entropy_sum
from tunelab.modules.loss.dpo import (
    LOSS_TYPES,
    REFERENCE_FREE,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    preference_loss,
    sequence_log_probs,
    sequence_log_probs_from_hidden,
    simpo_loss,
    token_log_probs_from_hidden,
    whole_sequence_labels,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "REFERENCE_FREE",
    "cross_entropy_sum",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "orpo_loss",
    "preference_loss",
    "sequence_log_probs",
    "sequence_log_probs_from_hidden",
    "simpo_loss",
    "token_log_probs_from_hidden",
    "whole_sequence_labels",
]
