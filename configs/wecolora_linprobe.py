r"""Linear probing of a WeCoLoRA student, its teacher or the WeCo+KD baseline (MAE recipe, docs/methods.md section 7).

Frozen backbone -> class token after the final norm -> BatchNorm (no affine) + linear head
trained with LARS (trust 0.001), lr = 0.1 * 512 / 256, batch 512, 10 warmup epochs, cosine to
0, 90 epochs (50 for CIFAR-100); best and last top-1 (mean AUROC for ChestX-ray14) reported.

    # the distilled student (teacher file + the distillation run's LoRA, merged):
    python -m idat_jax.main --config configs/wecolora_linprobe.py:r=2,student_run=runs/weco/r2 \
      --workdir runs/probe/r2 --config.models.teacher.checkpoint=pretrained/mae_pretrain_vit_base.pth
    # the teacher itself: r=1; the copied-but-undistilled student: r=2 without student_run.

Data sets (``dataset=``), each with the reference's probe preprocessing (``main_linprobe.py``;
``idat_jax/data/probe_transforms.py``):

* ``cifar100`` (TFDS, train / test) and ``flowers`` (TFDS oxford_flowers102, train / test):
  Resize(256, bicubic) + CenterCrop(224), ImageNet mean/std; features cached once.
* ``imagenet`` and ``inat19``: an ImageNet-layout folder ``root=DIR`` with ``DIR/train/<class>``
  and ``DIR/val/<class>``; same transform. ``few_shot=True`` probes on the reference's 10% per
  class subset of the train split (its ``--few_shot``).
* ``resisc45``: an image folder of all 31,500 images (``root=DIR``, one folder per class), the
  reference's stratified 10% train / 90% test split (seed = ``seed``); train images get
  Resize((224, 224)) + RandomResizedCrop(0.2-1) + flip, streamed (the backbone runs per step);
  eval Resize((224, 224)); the reference's RESISC45 mean/std.
* ``chestxray``: NIH ChestX-ray14 in its official layout (``root=DIR``; train_val_list / test_list),
  15 labels with "No Finding", BCE-with-logits, mean AUROC over the labels; train images get
  Resize(224) + flip + ColorJitter(0.2, 0.2), streamed; eval Resize(224); mean 0.5057, std 0.2507 (eval 0.2508).
* ``csv``: ``root=DIR`` with ``DIR/train.csv`` and ``DIR/test.csv`` (image path + 0/1 label
  columns; e.g. RSNA): multi-label like ChestX-ray14, direct resize unless ``transform=``.

Other arguments: r, student_run, backend (overrides the data set's), transform (overrides the
data set's: resize_crop | cxr | resisc45 | direct), augment (False: no random train transform;
features of the eval transform are cached), epochs, warmup (epochs, 10), seed, teacher (a path,
a registered name such as mae-vit-base or timm-vit-base-patch16-224-jx, a URL or
hf-hub:ORG/NAME; the default MAE file is downloaded when pretrained/ lacks it).
"""

from idat_jax import config_lib
from idat_jax.data import vtab
from idat_jax.methods.wecolora import linear_probe_lr

# dataset -> (backend, task, train split, eval split, probe transform, epochs)
DATASETS = {
    "cifar100": ("tfds_images", "cifar100", "train", "test", "resize_crop", 50),
    "flowers": ("tfds_images", "oxford_flowers102", "train", "test", "resize_crop", 90),
    "imagenet": ("image_folder", "imagenet", "train", "val", "resize_crop", 90),
    "imagenet2012": ("tfds_images", "imagenet2012", "train", "validation", "resize_crop", 90),
    "inat19": ("image_folder", "inat19", "train", "val", "resize_crop", 90),
    # Both sides of the stratified split of 'train' (the eval split's name only has to differ).
    "resisc45": ("image_folder", "resisc45", "train", "test", "resisc45", 90),
    "chestxray": ("chestxray", "chestxray14", "train", "test", "cxr", 90),
    "csv": ("multilabel_csv", "csv", "train", "test", "direct", 90),
}
FEW_SHOT_RATIO = 0.1  # the reference's --few_shot (DatasetFolderWithPath ratio)


def get_config(arg=None):
  a = config_lib.parse_arg(arg, r=2, student_run="", dataset="cifar100", backend="", root="",
                           transform="", few_shot=False, augment=True, epochs=0, warmup=10,
                           teacher="pretrained/mae_pretrain_vit_base.pth", seed=0)
  c = config_lib.base_config()
  c.method = "linear_probe"
  c.seed = a.seed
  if a.dataset in DATASETS:
    backend, task, train_split, eval_split, transform, epochs = DATASETS[a.dataset]
  else:  # any other TFDS image classification set, with the natural-image transform
    backend, task, train_split, eval_split, transform, epochs = (
        "tfds_images", a.dataset, "train", "test", "resize_crop", 90)
  transform = a.transform or transform
  c.probe.update(dict(reduction=a.r, student_run=a.student_run, transform=transform,
                      train_augment=a.augment))

  c.data.backend = a.backend or backend
  c.data.root = a.root
  c.data.task = task
  c.data.train_split = train_split
  c.data.eval_split = eval_split
  if c.data.backend == "folder":
    # A VTAB-1K folder task (NOAH/SSF layout): the iDAT protocol's splits.
    c.data.train_split, c.data.eval_split = vtab.DEFAULT_TRAIN_SPLIT, vtab.DEFAULT_EVAL_SPLIT
  if a.dataset == "resisc45":
    # The reference's split: stratified 10% train / 90% test of all images, seed = its --seed.
    c.data.stratified_split = 0.1
    c.data.stratified_seed = a.seed
  if a.few_shot:
    c.data.few_shot_ratio = FEW_SHOT_RATIO
    c.data.few_shot_seed = 12
  c.data.image_size = 224
  c.data.normalization = {"cxr": "chestxray", "resisc45": "resisc45"}.get(transform, "imagenet")

  c.models.teacher = config_lib.model_config("B/16", a.teacher, "full")

  c.batch_size = 512
  c.eval_batch_size = 512
  c.optim.update(dict(name="lars", lr=linear_probe_lr(0.1, 512), weight_decay=0.0,
                      momentum=0.9, trust_coefficient=0.001, schedule="half_cycle_cosine",
                      epochs=a.epochs or epochs, warmup_epochs=a.warmup, cooldown_epochs=0,
                      min_lr=0.0))
  c.eval_every_epochs = 1
  c.log_every_steps = 50
  return c
