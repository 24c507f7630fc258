"""Image preprocessing: iDAT/SSF direct resize, on-device normalisation, WeCoLoRA augmentation.

* iDAT/SSF (the default): PIL bicubic resize straight to size x size (aspect ratio not kept,
  no crop, no flip), done once on the host; uint8 goes to the device and :func:`normalize`
  maps it to [-1, 1] (mean = std = 0.5, timm's "inception" statistics) inside jit.
* WeCoLoRA distillation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) and a
  horizontal flip with p = 0.5 on the host, deterministic from (seed, epoch, index), then
  ImageNet mean/std on the device.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from idat_jax.data.base import DataError, ImageLike

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "inception" gives [-1, 1] (iDAT, SSF, timm ViT defaults); "imagenet" is NOAH's and WeCoLoRA's.
NORMALIZATIONS = {
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}

# Named normalisations whose reference evaluates with other statistics than it trains with
# (ChestX-ray14's probe: std 0.2507 in training, 0.2508 in evaluation); see probe_transforms.
EVAL_NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}

# Extensions that torchvision's ImageFolder accepts (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def normalization_stats(name: str, *, evaluation: bool = False
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of a named normalisation ('inception': [-1, 1], 'imagenet', ...); with
  ``evaluation`` the statistics the reference evaluates with, where they differ."""
  if name not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization {name!r}; valid: {', '.join(NORMALIZATIONS)}")
  if evaluation and name in EVAL_NORMALIZATIONS:
    return EVAL_NORMALIZATIONS[name]
  return NORMALIZATIONS[name]


def normalize(images: jax.Array | np.ndarray, mean: Sequence[float] | str = INCEPTION_MEAN,
              std: Sequence[float] | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 [..., 3] -> float ``(x / 255 - mean) / std``; jittable, runs on the device.

  ``mean`` may also be a name from :data:`NORMALIZATIONS` (then ``std`` is taken from it).
  Defaults give [-1, 1] as iDAT/SSF (mean = std = 0.5).
  """
  if isinstance(mean, str):
    if std is not None:
      raise ValueError("give either a normalization name or mean and std, not both")
    mean, std = normalization_stats(mean)
  elif std is None:
    std = INCEPTION_STD
  mean_arr = jnp.asarray(mean, dtype)
  std_arr = jnp.asarray(std, dtype)
  return (jnp.asarray(images).astype(dtype) / 255.0 - mean_arr) / std_arr


def to_pil(image: ImageLike) -> Image.Image:
  """An RGB PIL image from a PIL image or an (H, W, 3) uint8 array."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.dtype} {array.shape}")
  return Image.fromarray(array, "RGB")


# Single-channel modes with more than 8 bits per pixel (16-bit PNG/TIFF, 32-bit int, float).
# PIL's convert('RGB') clips these at 255, which turns almost every pixel of a 16-bit image
# white; they are rescaled by the image's own range instead (see to_8bit).
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
  """A wide single-channel image as 8-bit grey, by its own value range.

  The rule: ``round(255 * (x - min) / (max - min))`` over the image's finite pixels (NaN
  becomes 0); a constant image becomes all zeros. Each image is stretched on its own, as
  medical and remote-sensing viewers do for 12- to 16-bit data, so that the full uint8 range
  carries the image's contrast whatever its bit depth.
  """
  array = np.asarray(image, np.float64)
  finite = np.isfinite(array)
  if not finite.any():
    return Image.fromarray(np.zeros(array.shape, np.uint8), "L")
  lo, hi = float(array[finite].min()), float(array[finite].max())
  scaled = np.zeros(array.shape, np.float64)
  if hi > lo:
    scaled = np.where(finite, (array - lo) * (255.0 / (hi - lo)), 0.0)
  return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def load_image_file(path: str | os.PathLike) -> Image.Image:
  """Decodes an image file to RGB like torchvision's default loader (``convert('RGB')``).

  16-bit, 32-bit and float single-channel images are first mapped to 8 bits by
  :func:`to_8bit`; a mode PIL cannot convert to RGB raises ``ValueError`` (callers name the
  file).
  """
  with Image.open(path) as image:
    if image.mode in WIDE_MODES:
      image.load()
      return to_8bit(image).convert("RGB")
    if image.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                          "YCbCr", "LAB", "HSV"):
      raise ValueError(f"image mode {image.mode!r} cannot be converted to 8-bit RGB "
                       "faithfully; convert the file to an 8- or 16-bit PNG or a JPEG")
    return image.convert("RGB")


def read_image(path: str | os.PathLike, where: str = "") -> Image.Image:
  """:func:`load_image_file`, with any failure (missing, truncated, not an image, an
  unconvertible mode) raised as one :class:`DataError` naming the file (and ``where``: e.g.
  the list file and line that named it)."""
  try:
    return load_image_file(path)
  except Exception as e:  # noqa: BLE001  (every reason is reported, with the file)
    prefix = f"{where}: " if where else ""
    raise DataError(f"{prefix}cannot read image {path}: {type(e).__name__}: {e}") from e


def resize(image: ImageLike, size: int) -> np.ndarray:
  """Direct bicubic resize to size x size (iDAT/SSF ``transforms_direct_resize``), uint8."""
  pil = to_pil(image)
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.BICUBIC)
  return np.asarray(pil, np.uint8)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """(left, top, w, h) of torchvision's RandomResizedCrop: 10 tries, then a centre crop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one example's augmentation: a pure function of (seed, epoch, index)."""
  return np.random.default_rng([int(seed), int(epoch), int(index)])


def random_resized_crop_flip(image: ImageLike, size: int, rng: np.random.Generator,
                             scale: tuple[float, float] = (0.2, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             flip_prob: float = 0.5) -> np.ndarray:
  """WeCoLoRA's train transform (RandomResizedCrop bicubic + horizontal flip), uint8 out."""
  pil = to_pil(image)
  left, top, w, h = random_resized_crop_box(pil.width, pil.height, rng, scale, ratio)
  pil = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
  if rng.random() < flip_prob:
    pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(pil, np.uint8)
