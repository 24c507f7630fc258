r"""WeCoLoRA distillation (dianagrigore/WeCoLoRA, README command and docs/methods.md sections 5-6).

Teacher ViT-B/16 (supervised ``.npz`` or MAE ``.pth``/``.safetensors``), student = teacher
blocks 0, r, 2r, ... with LoRA (rank 128, scale 1) on q, k, v, out, fc1, fc2; L1 between the
last-block outputs before the final norm; AdamW (0.9, 0.95), wd 0.05, lr = 1e-3 * 1024 / 256,
batch 128 x 8 accumulation, 10 epochs (2 warmup), per-step half-cycle cosine; few-shot subset
(1% per class) of an ImageNet-layout folder with RandomResizedCrop(0.2-1) + flip.

    python -m idat_jax.main --config configs/wecolora_distill.py:r=2 --workdir runs/weco/r2 \
      --config.data.root=/data/imagenet/train \
      --config.models.teacher.checkpoint=pretrained/mae_pretrain_vit_base.pth

Arguments: r (2), rank (128), lora (enhanced | plain), student (lora | weco_kd | no_copy),
loss (last | segments), ratio (the paper's alpha: 0.01 or 0.1 of every class), root (the
ImageNet-layout folder, same as --config.data.root), backend (image_folder | tfds_images),
dataset (TFDS name for tfds_images, e.g. imagenet2012), teacher (a path, a registered name such as
mae-vit-base or timm-vit-base-patch16-224-jx, a URL or hf-hub:ORG/NAME; the default MAE file is
downloaded when pretrained/ lacks it), seed.
"""

from idat_jax import config_lib
from idat_jax.methods.wecolora import distill_lr


def get_config(arg=None):
  a = config_lib.parse_arg(arg, r=2, rank=128, lora="enhanced", student="lora", loss="last",
                           ratio=0.01, backend="image_folder", dataset="imagenet2012", root="",
                           teacher="pretrained/mae_pretrain_vit_base.pth", seed=0)
  c = config_lib.base_config()
  c.method = "wecolora"
  c.seed = a.seed
  c.wecolora.update(dict(reduction=a.r, student=a.student, loss=a.loss))

  c.data.backend = a.backend
  c.data.root = a.root
  c.data.task = a.dataset
  c.data.train_split = "train"
  c.data.image_size = 224
  c.data.normalization = "imagenet"   # as the reference (also for the supervised teacher)
  c.data.augment = True
  c.data.few_shot_ratio = a.ratio
  c.data.few_shot_seed = 12

  c.models.teacher = config_lib.model_config("B/16", a.teacher, "full")
  c.models.student = config_lib.model_config("B/16", "", "lora")
  c.models.student.tuning.update(dict(lora_rank=a.rank, lora_targets=a.lora, lora_scale=1.0))

  c.batch_size = 128
  c.optim.update(dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                      lr=distill_lr(1e-3, 128, 8), accum_steps=8, schedule="half_cycle_cosine",
                      epochs=10, warmup_epochs=2, cooldown_epochs=0, min_lr=0.0))
  c.optim.decay_mask = "mae"        # timm 0.3.2 add_weight_decay: WeCo+KD decays cls/pos_embed
  c.eval_every_epochs = 0           # unsupervised: nothing to evaluate during distillation
  c.log_every_steps = 8
  return c
