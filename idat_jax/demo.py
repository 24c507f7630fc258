"""The embedded end-to-end demo on scikit-learn's handwritten digits (no download).

    python -m idat_jax.demo --workdir runs/demo

1. Pretrains a small and a larger tiny ViT from scratch (full training) on digits 0-4 and
   writes both as Google-format ``.npz`` files, like the official AugReg checkpoints.
2. Tunes on digits 5-9, in the VTAB folder layout: iDAT (larger = student, smaller =
   teacher, gist_seq adapters + heads only) next to adapter-tuning of the student alone.
3. Evaluates the iDAT student again from its Orbax checkpoint (``mode=eval``) and prints the
   comparison table.
4. WeCoLoRA: distils an r=2 student (blocks 0 and 2 of the larger ViT, LoRA) from the larger
   ViT on the ~200 unlabelled digits 0-4 test images, then linearly probes the teacher, the
   copied student and the distilled student few-shot on digits 0-4 (10% of its training images
   train the probe, the other 90% test it).
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


# WeCoLoRA stage: reduction, LoRA rank, distillation epochs, the probes' labelled fraction.
WECO = dict(reduction=2, rank=8, epochs=30, probe_fraction=0.1, probe_epochs=100)
PROBES = ("probe_teacher", "probe_copied", "probe_distilled")


def demo_config(stage: str, data_root: str, *, seed: int = 0, epochs: int = 0,
                pretrained: dict[str, str] | None = None,
                student_run: str = "") -> ml_collections.ConfigDict:
  """Config of one demo stage: pretrain_small | pretrain_large | idat | adapter |
  weco_distill | probe_teacher | probe_copied | probe_distilled (``student_run``: the
  distillation's work dir)."""
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
  elif stage == "weco_distill":
    # The few-shot distillation: digits 0-4 play ImageNet's part. The student sees their test
    # split's images (about 200, no labels, RandomResizedCrop + flip), which the probes below
    # never use.
    c.method = "wecolora"
    c.data.task = "digits_0to4"
    c.data.train_split = "test"
    c.data.augment = True
    c.wecolora.reduction = WECO["reduction"]
    c.models.teacher = model_block("large", (pretrained or {}).get("large", ""), "full")
    c.models.student = model_block("large", "", "lora")
    c.models.student.tuning.lora_rank = WECO["rank"]
    c.batch_size = 20
    c.optim.update(dict(b2=0.95, lr=4e-3, weight_decay=0.05, schedule="half_cycle_cosine",
                        epochs=epochs or WECO["epochs"], warmup_epochs=1, min_lr=0.0))
    c.eval_every_epochs = 0
  elif stage in PROBES:
    c.method = "linear_probe"
    # Probed on the distillation's domain, as the paper's ImageNet column, few-shot: a
    # stratified 10% of the digits 0-4 training images train the probe, the other 90% test it.
    c.data.task = "digits_0to4"
    c.data.stratified_split = WECO["probe_fraction"]
    c.models.teacher = model_block("large", (pretrained or {}).get("large", ""), "full")
    c.probe.reduction = 1 if stage == "probe_teacher" else WECO["reduction"]
    c.probe.student_run = student_run if stage == "probe_distilled" else ""
    if stage == "probe_distilled" and not student_run:
      raise ValueError("demo stage probe_distilled needs student_run (the distillation run)")
    probe_epochs = epochs or WECO["probe_epochs"]
    c.optim.update(dict(name="lars", lr=20.0, weight_decay=0.0, momentum=0.9,
                        trust_coefficient=0.001, schedule="half_cycle_cosine",
                        epochs=probe_epochs, warmup_epochs=5, min_lr=0.0))
    c.eval_every_epochs = probe_epochs
    c.log_every_steps = 200
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

  distill_dir = os.path.join(workdir, "weco_distill")
  results["weco_distill"] = train.train_and_evaluate(
      demo_config("weco_distill", data_root, seed=seed, pretrained=pretrained), distill_dir)
  for stage in PROBES:
    config = demo_config(stage, data_root, seed=seed, pretrained=pretrained,
                         student_run=distill_dir)
    results[stage] = train.train_and_evaluate(config, os.path.join(workdir, stage))

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
  if all(stage in results for stage in ("weco_distill",) + PROBES):
    d = results["weco_distill"]
    blocks = len(range(0, ARCH["large"]["depth"], WECO["reduction"]))
    rows += ["", f"WeCoLoRA: r={WECO['reduction']} student ({blocks} of "
             f"{ARCH['large']['depth']} blocks of the larger ViT, LoRA rank {WECO['rank']}, "
             f"{d['counts']['student'][0]:,} trainable) distilled on "
             f"{d.get('train_images', '?')} unlabelled digits 0-4 test images; linear probes "
             f"trained on {WECO['probe_fraction']:.0%} of the digits 0-4 training images, "
             "tested on the rest (images the teacher was pretrained on, with labels):", "",
             "| probed backbone | blocks | best top-1 | last top-1 |", "|---|---|---|---|"]
    for stage, label, n in (("probe_teacher", "teacher (larger ViT)", ARCH["large"]["depth"]),
                            ("probe_copied", "copied student, not distilled", blocks),
                            ("probe_distilled", "WeCoLoRA student (distilled)", blocks)):
      r = results[stage]
      rows.append(f"| {label} | {n} | {pct(r['best_top1'])} | {pct(r['last_top1'])} |")
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
