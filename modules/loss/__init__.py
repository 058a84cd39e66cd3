"""Training losses that research code can import alone (no training/recipes imports).

    from tunelab.modules.loss import sequence_log_probs, dpo_loss
    logp, n = sequence_log_probs(model(tokens), labels)         # [2b] each, chosen rows first
    losses, r_chosen, r_rejected = preference_loss("sigmoid", logp, ref_logp, n, beta=0.1)
"""

from tunelab.modules.loss.dpo import (
    LOSS_TYPES,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    sequence_log_probs,
    sequence_log_probs_from_hidden,
    simpo_loss,
)

__all__ = [
    "LOSS_TYPES",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "sequence_log_probs",
    "sequence_log_probs_from_hidden",
    "simpo_loss",
]
