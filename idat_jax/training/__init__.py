"""Training utilities: trainable-parameter selection, LR schedules and optimizers."""

from idat_jax.training.optim import adamw
from idat_jax.training.optim import lars
from idat_jax.training.optim import weight_decay_mask
from idat_jax.training.optim import with_accumulation
from idat_jax.training.schedules import half_cycle_cosine
from idat_jax.training.schedules import half_cycle_cosine_lr
from idat_jax.training.schedules import per_epoch_schedule
from idat_jax.training.schedules import timm_cosine_epoch_lr
from idat_jax.training.schedules import timm_cosine_epoch_lrs
from idat_jax.training.schedules import timm_cosine_schedule
from idat_jax.training.schedules import timm_cosine_step_schedule
from idat_jax.training.trainable import combine
from idat_jax.training.trainable import count_params
from idat_jax.training.trainable import match_rules
from idat_jax.training.trainable import parameter_counts
from idat_jax.training.trainable import parameter_report
from idat_jax.training.trainable import partition
from idat_jax.training.trainable import trainable_mask
