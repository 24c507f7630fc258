"""The probe transforms against torchvision's rules on real photographs (issue 13, item 6).

torchvision itself is not installable next to this CPU torch build (tests/torchvision_shim
only stubs what timm imports), so each transform is checked against an independent
re-expression of what torchvision 0.8 (the reference's version) computes on a PIL image:

* Resize(int) / CenterCrop: torchvision's size and offset formulas written out here, with PIL's
  ``Image.resize`` as the resampler (torchvision calls exactly that for PIL images);
* ColorJitter(brightness, contrast): PIL's blend arithmetic written in NumPy (torchvision
  calls ``ImageEnhance`` for PIL images): x * b, and m + c (x - m) with m the rounded mean of
  the grey image, truncated to uint8;
* RESISC45's tensor Resize((224, 224)): ``torch.nn.functional.interpolate`` (bilinear,
  ``align_corners=False``), which is the call torchvision makes for tensors.

The images are scikit-learn's bundled photographs (427 x 640 JPEGs, no download).
Pass: max abs difference <= 1 on uint8.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from idat_jax.data import inputs, preprocess, probe_transforms as pt
from idat_jax.data.base import ArraySource


@pytest.fixture(scope="module")
def photos():
  return [Image.fromarray(a) for a in load_sample_images().images]


def _tv_resize_int(img, size, resample):
  w, h = img.size
  if w <= h:
    ow, oh = size, int(size * h / w)
  else:
    oh, ow = size, int(size * w / h)
  return img.resize((ow, oh), resample)


def _tv_center_crop(img, size):
  w, h = img.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def _maxdiff(a, b):
  return int(np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max())


@pytest.mark.parametrize("size", [224, 32])
def test_resize_crop_is_torchvision_resize256_centercrop224(photos, size):
  for photo in photos + [photos[0].transpose(Image.TRANSPOSE)]:  # landscape and portrait
    want = _tv_center_crop(_tv_resize_int(photo, int(size / 0.875), Image.BICUBIC), size)
    got = pt.resize_crop(photo, size)
    assert got.shape == (size, size, 3)
    assert _maxdiff(got, want) <= 1
  # 256 for 224: the reference's numbers.
  assert pt.resize_crop_size(224) == 256
  # The crop is centred: 427x640 -> 256x383 -> left int(round(79.5)) = 80, top 16.
  w, h = _tv_resize_int(photos[0], 256, Image.BICUBIC).size
  assert (w, h) == (383, 256)


def _grey_square(photo, side):
  grey = photo.convert("L").crop((0, 0, min(photo.size), min(photo.size))).resize((side, side))
  return grey.convert("RGB")


def test_cxr_eval_is_resize224_bilinear(photos):
  image = _grey_square(photos[0], 300)
  want = _tv_resize_int(image, 224, Image.BILINEAR)
  got = pt.cxr_eval(image, 224)
  assert _maxdiff(got, want) <= 1 and got.shape == (224, 224, 3)


def _np_brightness(x, f):
  return np.trunc(np.clip(x.astype(np.float64) * f, 0, 255))


def _np_contrast(x, f):
  grey = x[..., 0].astype(np.float64)  # R = G = B: PIL's L conversion is exact
  m = int(grey.mean() + 0.5)
  return np.trunc(np.clip(m + f * (x.astype(np.float64) - m), 0, 255))


@pytest.mark.parametrize("seed", range(4))
def test_cxr_train_is_flip_and_color_jitter(photos, seed):
  image = _grey_square(photos[seed % 2], 256)
  got = pt.cxr_train(image, 224, np.random.default_rng(seed))
  # The same draws, in the same order, re-expressed with the formulas above.
  rng = np.random.default_rng(seed)
  x = np.asarray(_tv_resize_int(image, 224, Image.BILINEAR), np.uint8)
  if rng.random() < 0.5:
    x = x[:, ::-1]
  order = rng.permutation(2)
  b, c = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
  for op in order:
    x = (_np_brightness(x, b) if op == 0 else _np_contrast(x, c)).astype(np.uint8)
  assert _maxdiff(got, x) <= 1
  assert not np.array_equal(got, np.asarray(_tv_resize_int(image, 224, Image.BILINEAR)))


def test_color_jitter_draws_have_torchvisions_distribution():
  """Factors uniform in [0.8, 1.2]; both orders; flips at rate 1/2 (over 400 draws)."""
  flips, orders, factors = [], [], []
  image = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
  for i in range(400):
    rng = np.random.default_rng([7, i])
    flips.append(rng.random() < 0.5)
    orders.append(tuple(rng.permutation(2)))
    factors += [rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)]
    pt.cxr_train(image, 8, np.random.default_rng([7, i]))
  assert 0.4 < np.mean(flips) < 0.6 and set(orders) == {(0, 1), (1, 0)}
  assert 0.8 <= min(factors) and max(factors) <= 1.2 and abs(np.mean(factors) - 1) < 0.02


def test_resisc45_eval_is_torch_bilinear_tensor_resize(photos):
  for photo in photos:
    square = photo.crop((0, 0, 256, 256))  # RESISC45 images are 256 x 256
    tensor = torch.from_numpy(np.asarray(square, np.float32) / 255).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(tensor, size=(224, 224), mode="bilinear",
                                           align_corners=False)[0].permute(1, 2, 0).numpy()
    got = pt.resisc45_eval(square, 224)
    # Rounding to uint8 (plus float32 noise in torch's result).
    assert np.abs(got.astype(np.float64) / 255 - want).max() <= 0.51 / 255
    assert _maxdiff(got, np.rint(want * 255)) <= 1


def test_resisc45_train_geometry(photos):
  square = photos[0].crop((0, 0, 256, 256))
  rng = np.random.default_rng(3)
  got = pt.resisc45_train(square, 224, rng)
  rng = np.random.default_rng(3)
  resized = square.resize((224, 224), Image.BILINEAR)
  want = preprocess.random_resized_crop_flip(resized, 224, rng, scale=(0.2, 1.0))
  np.testing.assert_array_equal(got, want)


def test_transformed_source_caches_under_its_own_key():
  images = np.random.default_rng(0).integers(0, 255, (3, 40, 50, 3), dtype=np.uint8)
  src = ArraySource(images, [0, 1, 0])
  wrapped = pt.TransformedSource(src, pt.resize_crop, 32, "resize_crop")
  image, label = wrapped.get(1)
  assert label == 1 and image.shape == (32, 32, 3)
  np.testing.assert_array_equal(image, pt.resize_crop(images[1], 32))
  assert wrapped.fingerprint() != src.fingerprint()
  np.testing.assert_array_equal(wrapped.labels(), [0, 1, 0])
  # The decode cache's own resize leaves an already-transformed image untouched.
  np.testing.assert_array_equal(preprocess.resize(image, 32), image)


def test_normalizations_are_registered():
  assert preprocess.normalization_stats("chestxray") == ((0.5057,) * 3, (0.2507,) * 3)
  # The reference evaluates ChestX-ray14 with std 0.2508 (its training transform has 0.2507).
  assert preprocess.normalization_stats("chestxray", evaluation=True) == (
      (0.5057,) * 3, (0.2508,) * 3)
  assert preprocess.normalization_stats("imagenet", evaluation=True) == (
      preprocess.normalization_stats("imagenet"))
  white = {"image": np.full((1, 2, 2, 3), 255, np.uint8)}
  np.testing.assert_allclose(inputs.image_input("chestxray")(white), (1 - 0.5057) / 0.2508,
                             rtol=1e-6)
  np.testing.assert_allclose(inputs.image_batch("chestxray")(white)["image"],
                             (1 - 0.5057) / 0.2507, rtol=1e-6)
  assert preprocess.normalization_stats("resisc45") == (
      (0.3684, 0.3813, 0.3439), (0.1999, 0.1814, 0.1808))
  with pytest.raises(ValueError, match="unknown probe transform"):
    pt.get("random_crop")
