"""The data pipeline's public names, from its two modules.

* :mod:`idat_jax.data.resident`: training sets kept on the devices, batched inside jit.
* :mod:`idat_jax.data.host_batches`: padded/masked evaluation batches and the streamed,
  augmented training iterator, prepared on the host.
"""

from idat_jax.data.host_batches import (  # noqa: F401
    DEFAULT_RESIDENT_BUDGET_BYTES, EvalIterator, StreamingTrainIterator)
from idat_jax.data.resident import (  # noqa: F401
    ResidentTrainSet, batch_indices, epoch_permutation, gather_batch, put_resident_train,
    resident_train_set, steps_per_epoch)
