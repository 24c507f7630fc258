"""Entry point: ``python -m idat_jax.main --config configs/idat_vtab.py:task=dtd --workdir runs/dtd``.

``config.mode=train`` trains (resuming from the work dir), ``config.mode=eval`` restores the
latest (or ``config.eval.step``) checkpoint and evaluates it.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg' (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, results).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  workdir = _WORKDIR.value
  # Imported late so that --helpfull stays fast and XLA flags from the shell apply.
  import jax
  from idat_jax import sharding, train

  from idat_jax.training.metrics import quiet_library_logs
  quiet_library_logs()
  jax.config.update("jax_threefry_partitionable", True)
  sharding.initialize_distributed(config.distributed)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  train.enable_compilation_cache(config, workdir)
  if config.mode == "train":
    summary = train.train_and_evaluate(config, workdir)
  elif config.mode == "eval":
    summary = train.evaluate_checkpoint(config, workdir)
  else:
    raise app.UsageError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")
  logging.info("summary: %s", json.dumps(summary, default=str))
  if jax.process_index() == 0:
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
  app.run(main)
