r"""Linear probing of a WeCoLoRA student, its teacher or the WeCo+KD baseline (MAE recipe, B.9).

Frozen backbone -> class token after the final norm, cached once on the device -> BatchNorm
(no affine) + linear head trained with LARS (trust 0.001), lr = 0.1 * 512 / 256, batch 512,
10 warmup epochs, cosine to 0, 90 epochs (50 for CIFAR-100); best and last top-1 reported.

    # the distilled student (teacher file + the distillation run's LoRA, merged):
    python -m idat_jax.main --config configs/wecolora_linprobe.py:r=2,student_run=runs/weco/r2 \
      --workdir runs/probe/r2 --config.models.teacher.checkpoint=pretrained/mae_pretrain_vit_base.pth
    # the teacher itself: r=1; the copied-but-undistilled student: r=2 without student_run.

Arguments: r, student_run, dataset (TFDS name, default cifar100; resisc45 uses the reference's
stratified 10% / 90% split), backend (tfds_images |
image_folder | folder), epochs, teacher, seed.
"""

from idat_jax import config_lib
from idat_jax.methods.wecolora import linear_probe_lr


def get_config(arg=None):
  a = config_lib.parse_arg(arg, r=2, student_run="", dataset="cifar100", backend="tfds_images",
                           epochs=0, teacher="pretrained/mae_pretrain_vit_base.pth", seed=0)
  c = config_lib.base_config()
  c.method = "linear_probe"
  c.seed = a.seed
  c.probe.update(dict(reduction=a.r, student_run=a.student_run))

  c.data.backend = a.backend
  c.data.task = a.dataset
  c.data.train_split = "train"
  c.data.eval_split = "test" if a.dataset == "cifar100" else "validation"
  if a.dataset == "resisc45":
    # The reference's split: stratified 10% train / 90% test of all 31,500 images, seed 0.
    c.data.eval_split = "train"
    c.data.stratified_split = 0.1
    c.data.stratified_seed = 0
  c.data.image_size = 224
  c.data.normalization = "imagenet"

  c.models.teacher = config_lib.model_config("B/16", a.teacher, "full")

  epochs = a.epochs or (50 if a.dataset == "cifar100" else 90)
  c.batch_size = 512
  c.eval_batch_size = 512
  c.optim.update(dict(name="lars", lr=linear_probe_lr(0.1, 512), weight_decay=0.0,
                      momentum=0.9, trust_coefficient=0.001, schedule="half_cycle_cosine",
                      epochs=epochs, warmup_epochs=10, cooldown_epochs=0, min_lr=0.0))
  c.eval_every_epochs = 1
  c.log_every_steps = 50
  return c
