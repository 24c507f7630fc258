"""WeCoLoRA's linear-probe image transforms, per data set, as its ``main_linprobe.py`` has them.

Each named transform is a pair (train, eval) on PIL images, giving uint8 ``size x size``:

* ``resize_crop`` (ImageNet, iNaturalist19, CIFAR-100, Flowers): Resize(256, bicubic, shorter
  side) + CenterCrop(224) for both splits, no augmentation (256 = 224 / 0.875 scales with
  ``size``). ImageNet mean/std.
* ``cxr`` (ChestX-ray14): eval Resize(224) (bilinear, shorter side); train adds a random
  horizontal flip and ColorJitter(brightness=0.2, contrast=0.2). Mean 0.5057, std 0.2507 in
  training and 0.2508 in evaluation (as the reference).
* ``resisc45`` (NWPU-RESISC45, ``create_NWPU_RESISC``): eval Resize((224, 224)) bilinear on
  the float tensor (torch's interpolation, no antialiasing, as torchvision 0.8 did); train
  Resize((224, 224)) on the PIL image + RandomResizedCrop(224, scale 0.2-1, bicubic) + flip.
  Its own mean/std.
* ``direct``: the project's VTAB rule (bicubic straight to size x size) for both.

The geometry follows torchvision's rules exactly (``int(size * long / short)`` for the long
side, ``int(round((h - size) / 2))`` for the crop offset); resampling and colour changes are
PIL's (``Image.resize``, ``ImageEnhance``), which is what torchvision calls on PIL images.
Random draws come from a NumPy generator, so a train image's augmentation is a pure function
of (seed, epoch, index); their distributions are torchvision's (flip p = 0.5; brightness and
contrast factors uniform in [0.8, 1.2], applied in a random order).

Deterministic transforms are applied by :class:`TransformedSource` (decoded once and cached,
like any source); random ones by the probe's streamed train iterator.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

from idat_jax.data import preprocess
from idat_jax.data.base import ImageLike, Source

# The reference (main_linprobe.py) trains ChestX-ray14 with std 0.2507 and evaluates it with
# std 0.2508; both are kept, so its test-set logits are reproduced to the last digit.
CXR_MEAN, CXR_STD, CXR_EVAL_STD = (0.5057,) * 3, (0.2507,) * 3, (0.2508,) * 3
RESISC45_MEAN, RESISC45_STD = (0.3684, 0.3813, 0.3439), (0.1999, 0.1814, 0.1808)
# Registered into idat_jax.data.preprocess.NORMALIZATIONS (see register_normalizations).
NORMALIZATIONS = {"chestxray": (CXR_MEAN, CXR_STD), "resisc45": (RESISC45_MEAN, RESISC45_STD)}
EVAL_NORMALIZATIONS = {"chestxray": (CXR_MEAN, CXR_EVAL_STD)}


def register_normalizations() -> None:
  """Makes ``data.normalization='chestxray' | 'resisc45'`` valid for the device normaliser."""
  for name, stats in NORMALIZATIONS.items():
    preprocess.NORMALIZATIONS.setdefault(name, stats)
  for name, stats in EVAL_NORMALIZATIONS.items():
    preprocess.EVAL_NORMALIZATIONS.setdefault(name, stats)


register_normalizations()


# ---------------------------------------------------------------------------------------------
# Geometry (torchvision's rules on PIL images).


def resize_shorter(image: Image.Image, size: int, resample: int) -> Image.Image:
  """``transforms.Resize(size)``: the shorter side becomes ``size``, the longer
  ``int(size * long / short)``."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return image
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  return image.resize((new_w, new_h), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """``transforms.CenterCrop(size)`` on an image at least ``size`` on each side."""
  w, h = image.size
  if w < size or h < size:
    raise ValueError(f"center crop {size} of a {w}x{h} image (resize first)")
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def resize_crop_size(size: int) -> int:
  """The resize before the centre crop: 256 for 224 (crop fraction 0.875)."""
  return int(size / 0.875)


def _array(image: Image.Image) -> np.ndarray:
  return np.asarray(image, np.uint8)


# ---------------------------------------------------------------------------------------------
# The transforms.


def resize_crop(image: ImageLike, size: int) -> np.ndarray:
  pil = preprocess.to_pil(image)
  return _array(center_crop(resize_shorter(pil, resize_crop_size(size), Image.BICUBIC), size))


def cxr_eval(image: ImageLike, size: int) -> np.ndarray:
  """Resize(size) bilinear; then a centre crop, a no-op on ChestX-ray14's square images
  (the reference cannot batch non-square ones)."""
  pil = preprocess.to_pil(image)
  return _array(center_crop(resize_shorter(pil, size, Image.BILINEAR), size))


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.2,
                 contrast: float = 0.2) -> Image.Image:
  """ColorJitter(brightness, contrast): factors uniform in [1 - x, 1 + x], random order."""
  order = rng.permutation(2)
  b = rng.uniform(1 - brightness, 1 + brightness)
  c = rng.uniform(1 - contrast, 1 + contrast)
  for op in order:
    if op == 0:
      image = ImageEnhance.Brightness(image).enhance(b)
    else:
      image = ImageEnhance.Contrast(image).enhance(c)
  return image


def cxr_train(image: ImageLike, size: int, rng: np.random.Generator) -> np.ndarray:
  pil = preprocess.to_pil(image)
  pil = center_crop(resize_shorter(pil, size, Image.BILINEAR), size)
  if rng.random() < 0.5:
    pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
  return _array(color_jitter(pil, rng))


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source rows and weights of torch's bilinear resize, ``align_corners=False``, no
  antialiasing: source coordinate ``(i + 0.5) * in / out - 0.5``, clamped at 0."""
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, src - lo


def tensor_bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W, C) float64 -> (height, width, C): ``transforms.Resize((h, w))`` on a tensor in
  torchvision 0.8 (the reference's version), i.e. ``F.interpolate(mode='bilinear',
  align_corners=False)`` without antialiasing."""
  lo, hi, w = _linear_taps(image.shape[0], height)
  rows = image[lo] * (1 - w)[:, None, None] + image[hi] * w[:, None, None]
  lo, hi, w = _linear_taps(image.shape[1], width)
  return rows[:, lo] * (1 - w)[None, :, None] + rows[:, hi] * w[None, :, None]


def resisc45_eval(image: ImageLike, size: int) -> np.ndarray:
  """ToTensor then Resize((size, size)) on the tensor (bilinear, not antialiased), as the
  reference's RESISC45 test transform; rounded back to uint8 (error <= 0.5 / 255)."""
  array = np.asarray(preprocess.to_pil(image), np.float64)
  if array.shape[:2] == (size, size):
    return array.astype(np.uint8)
  out = tensor_bilinear_resize(array, size, size)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resisc45_train(image: ImageLike, size: int, rng: np.random.Generator) -> np.ndarray:
  """Resize((size, size)) on the PIL image (PIL bilinear), RandomResizedCrop(size, scale
  0.2-1, bicubic), horizontal flip."""
  pil = preprocess.to_pil(image)
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.BILINEAR)
  return preprocess.random_resized_crop_flip(pil, size, rng, scale=(0.2, 1.0))


def direct(image: ImageLike, size: int) -> np.ndarray:
  return preprocess.resize(image, size)


@dataclasses.dataclass(frozen=True)
class ProbeTransform:
  """A data set's probe preprocessing: deterministic eval, train (random or not), stats."""
  name: str
  eval: Callable[[ImageLike, int], np.ndarray]
  # Random train transform ``(image, size, rng)``; None: the train split uses ``eval``.
  train_random: Callable[[ImageLike, int, np.random.Generator], np.ndarray] | None
  normalization: str


TRANSFORMS = {
    "resize_crop": ProbeTransform("resize_crop", resize_crop, None, "imagenet"),
    "cxr": ProbeTransform("cxr", cxr_eval, cxr_train, "chestxray"),
    "resisc45": ProbeTransform("resisc45", resisc45_eval, resisc45_train, "resisc45"),
    "direct": ProbeTransform("direct", direct, None, "imagenet"),
}


def get(name: str) -> ProbeTransform:
  if name not in TRANSFORMS:
    raise ValueError(f"unknown probe transform {name!r} (config probe.transform); valid: "
                     f"{', '.join(TRANSFORMS)}")
  return TRANSFORMS[name]


class TransformedSource(Source):
  """A source whose images come out already transformed to ``size x size`` (the decode
  cache's resize is then a no-op); the transform's name is part of the cache key."""

  def __init__(self, source: Source, transform: Callable[[ImageLike, int], np.ndarray],
               size: int, transform_name: str):
    self.source, self.transform, self.size = source, transform, size
    self.transform_name = transform_name
    self.num_classes = source.num_classes
    self.name = f"{source.name}|{transform_name}"
    for attr in ("multilabel", "label_names", "skipped"):
      if hasattr(source, attr):
        setattr(self, attr, getattr(source, attr))

  def __len__(self) -> int:
    return len(self.source)

  def get(self, index: int) -> tuple[ImageLike, int]:
    image, label = self.source.get(index)
    return self.transform(image, self.size), label

  def labels(self) -> np.ndarray:
    return self.source.labels()

  def cache_parts(self) -> tuple[str, ...] | None:
    parts = self.source.cache_parts()
    return None if parts is None else parts[:-1] + (f"{parts[-1]}_{self.transform_name}",)

  def fingerprint(self) -> str:
    return f"{self.source.fingerprint()}|{self.transform_name}"

  def file_stamps(self):
    stamps = getattr(self.source, "file_stamps", None)
    return stamps() if stamps is not None else None
