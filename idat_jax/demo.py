"""The embedded end-to-end demo on scikit-learn's handwritten digits (no download).

    python -m idat_jax.demo --workdir runs/demo

1. Pretrains a small and a larger tiny ViT from scratch (full training) on digits 0-4 and
   writes both as Google-format ``.npz`` files, like the official AugReg checkpoints.
2. Tunes on digits 5-9, in the VTAB folder layout: iDAT (larger = student, smaller =
   teacher, gist_seq adapters + heads only) next to adapter-tuning of the student alone.
3. Evaluates the iDAT student again from its Orbax checkpoint (``mode=eval``) and prints the
   comparison table.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import app, flags, logging

from idat_jax import config_lib


def _define_flags() -> None:
  """Flags exist only when the demo runs as a program, so importing it defines none."""
  flags.DEFINE_string("workdir", "runs/demo", "Where data, runs and results go.")
  flags.DEFINE_integer("epochs", 0, "Override the tuning epochs (0: demo default).")
  flags.DEFINE_integer("seed", 0, "Random seed of every stage.")

IMAGE_SIZE = 16
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TUNE_CLASSES = (5, 6, 7, 8, 9)
# Two tiny ViTs: the 'large' student and the 'small' teacher of iDAT.
ARCH = {
    "small": dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4),
    "large": dict(width=64, depth=4, num_heads=4, mlp_dim=128, patch_size=4),
}


def model_block(arch: str, checkpoint: str, mode: str) -> ml_collections.ConfigDict:
  m = config_lib.model_config("custom", checkpoint, mode)
  for key, value in ARCH[arch].items():
    m[key] = value
  m.head_init_std = 0.02
  return m


def demo_config(stage: str, data_root: str, *, seed: int = 0, epochs: int = 0,
                pretrained: dict[str, str] | None = None) -> ml_collections.ConfigDict:
  """Config of one demo stage: pretrain_small | pretrain_large | idat | adapter."""
  c = config_lib.base_config()
  c.seed = seed
  c.data.backend = "folder"
  c.data.root = data_root
  c.data.image_size = IMAGE_SIZE
  c.data.num_classes = 5
  c.batch_size = 50
  c.eval_batch_size = 200
  c.log_every_steps = 20
  c.keep_checkpoints = 1
  c.optim.update(dict(name="adamw", b1=0.9, b2=0.999, schedule="timm_cosine_epoch",
                      warmup_lr=1e-6, min_lr=1e-6, cooldown_epochs=0))
  if stage.startswith("pretrain_"):
    arch = stage.split("_", 1)[1]
    c.method = "supervised"
    c.data.task = "digits_0to4"
    c.models.student = model_block(arch, "", "full")
    c.optim.update(dict(lr=3e-3, weight_decay=0.05, epochs=epochs or 40, warmup_epochs=3))
    c.eval_every_epochs = 10
  elif stage in ("idat", "adapter"):
    pretrained = pretrained or {}
    c.data.task = "digits_5to9"
    c.models.student = model_block("large", pretrained.get("large", ""), "gist_seq_adapter")
    c.models.teacher = model_block("small", pretrained.get("small", ""), "gist_seq_adapter")
    c.method = "idat" if stage == "idat" else "supervised"
    c.optim.update(dict(lr=1e-2, weight_decay=5e-5, epochs=epochs or 30, warmup_epochs=3))
    c.eval_every_epochs = 1
  else:
    raise ValueError(f"unknown demo stage {stage!r}")
  c.lock()
  return c


def prepare_data(root: str, seed: int) -> None:
  from idat_jax.data.digits import write_digits_task
  write_digits_task(root, name="digits_0to4", classes=PRETRAIN_CLASSES, train_size=700, seed=seed)
  write_digits_task(root, name="digits_5to9", classes=TUNE_CLASSES, train_size=500, seed=seed)


def run_demo(workdir: str, *, seed: int = 0, epochs: int = 0) -> dict[str, dict]:
  from idat_jax import checkpoints, train
  t0 = time.time()
  data_root = os.path.join(workdir, "data")
  prepare_data(data_root, seed)
  results: dict[str, dict] = {}

  pretrained = {}
  for arch in ("small", "large"):
    stage = f"pretrain_{arch}"
    config = demo_config(stage, data_root, seed=seed)
    run_dir = os.path.join(workdir, stage)
    results[stage] = train.train_and_evaluate(config, run_dir)
    path = os.path.join(workdir, "pretrained", f"digits_vit_{arch}.npz")
    checkpoints.save_npz(train.restore_params(config, run_dir)["student"], path)
    pretrained[arch] = path
    logging.info("wrote %s", path)

  for stage in ("idat", "adapter"):
    config = demo_config(stage, data_root, seed=seed, epochs=epochs, pretrained=pretrained)
    results[stage] = train.train_and_evaluate(config, os.path.join(workdir, stage))

  config = demo_config("idat", data_root, seed=seed, epochs=epochs, pretrained=pretrained)
  with config.unlocked():
    config.mode = "eval"
  results["idat_eval"] = train.evaluate_checkpoint(config, os.path.join(workdir, "idat"))

  table = format_table(results)
  print(table)
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, default=str)
  print(f"demo finished in {time.time() - t0:.0f} s; results in {workdir}")
  return results


def format_table(results: dict[str, dict]) -> str:
  def pct(x):
    return "-" if x is None else f"{x:.2f}"
  rows = ["| run | data | trainable params | best top-1 | last top-1 |", "|---|---|---|---|---|"]
  for stage, data in (("pretrain_small", "digits 0-4"), ("pretrain_large", "digits 0-4"),
                      ("adapter", "digits 5-9"), ("idat", "digits 5-9")):
    r = results[stage]
    counts = r["counts"]
    trainable = " + ".join(f"{name} {c[0]:,}" for name, c in counts.items())
    rows.append(f"| {stage} | {data} | {trainable} | {pct(r['best_top1'])} | "
                f"{pct(r['last_top1'])} |")
  e = results["idat_eval"]
  rows.append(f"\niDAT student re-evaluated from its Orbax checkpoint (step {e['step']}): "
              f"top-1 {e['top1']:.2f}% (run reported {pct(e['reported_last_top1'])}%)")
  return "\n".join(rows)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from idat_jax.training.metrics import quiet_library_logs
  quiet_library_logs()
  run_demo(flags.FLAGS.workdir, seed=flags.FLAGS.seed, epochs=flags.FLAGS.epochs)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
