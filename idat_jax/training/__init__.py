"""Training utilities: trainable-parameter selection, LR schedules and optimizers.

The trainer's other parts (checkpointing, metrics, the work-dir lock, AUROC) are imported from
their modules.
"""

from idat_jax.training.optim import adamw, lars, weight_decay_mask, with_accumulation
from idat_jax.training.schedules import (half_cycle_cosine, half_cycle_cosine_lr,
                                         per_epoch_schedule, timm_cosine_epoch_lr,
                                         timm_cosine_epoch_lrs, timm_cosine_schedule,
                                         timm_cosine_step_schedule)
from idat_jax.training.trainable import (combine, count_params, match_rules, parameter_counts,
                                         parameter_report, partition, trainable_mask)

__all__ = [
    "adamw", "lars", "weight_decay_mask", "with_accumulation",
    "half_cycle_cosine", "half_cycle_cosine_lr", "per_epoch_schedule", "timm_cosine_epoch_lr",
    "timm_cosine_epoch_lrs", "timm_cosine_schedule", "timm_cosine_step_schedule",
    "combine", "count_params", "match_rules", "parameter_counts", "parameter_report",
    "partition", "trainable_mask",
]
