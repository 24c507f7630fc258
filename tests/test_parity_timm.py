"""Parity with timm (PyTorch, CPU) on random weights: npz, safetensors, .pth and round trips.

timm is the independent reference: its own npz loader (``_load_weights``) and its own forward
pass. torch and timm are required test dependencies; if they cannot be imported these tests
FAIL (they never skip), so CI cannot pass without the reference. All of them compare against
PyTorch, so the module is in the ``slow`` tier (``pytest -m "not slow"`` leaves it out).
"""

import argparse

import jax
import numpy as np
import pytest

from idat_jax import checkpoints as ck
from idat_jax import tree_util
from idat_jax.models import LoraConfig, PeftConfig, build_vit
from vit_testing import random_params

pytestmark = pytest.mark.slow

TOL = 1e-5

# name: (our build_vit args, timm model name, timm overrides, image size, num heads)
CONFIGS = {
    "tiny": ((None,), dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8,
                           image_size=32),
             "vit_base_patch16_224", dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2.0,
                                          patch_size=8, img_size=32), 32, 4),
    "S/16": (("S/16",), dict(depth=2), "vit_small_patch16_224", dict(depth=2), 224, 6),
    "B/16": (("B/16",), dict(depth=2), "vit_base_patch16_224", dict(depth=2), 224, 12),
}
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def ref():
  """torch + timm (+ timm's npz loader), or a hard failure saying how to install them."""
  try:
    import torch
    import timm
    from timm.models.vision_transformer import _load_weights
  except ImportError as e:
    pytest.fail(f"the timm parity tests need torch and timm ({e}); install them with "
                "`pip install -e .[test] && pip install --no-deps timm` "
                "(tests/torchvision_shim stands in for torchvision)", pytrace=False)
  torch.manual_seed(0)
  return torch, timm, _load_weights




def randomize_torch(torch, model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias") or name in ("cls_token", "pos_embed"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif not p.any():
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return model


class Pair:
  """Our model and timm's for one config, with cached compiled forward passes."""

  def __init__(self, name, ref, image_size=None):
    torch, timm, self.load_npz = ref
    self.name = name
    self.torch, self.timm = torch, timm
    args, kw, self.timm_name, self.timm_kw, size, self.heads = CONFIGS[name]
    self.size = image_size or size
    kw = dict(kw, image_size=self.size) if image_size else kw
    self.kw, self.args = kw, args
    self.model = build_vit(*args, num_classes=NUM_CLASSES, **kw)
    self.apply = jax.jit(self.model.apply)
    self.images = np.random.default_rng(7).normal(size=(2, self.size, self.size, 3)) \
        .astype(np.float32)

  def init(self, model=None, seed=100):
    """Stands in for a fresh init (random values, the model's exact tree)."""
    return random_params(model or self.model, seed, self.size)

  def ours(self, params, apply=None):
    return np.asarray((apply or self.apply)({"params": params}, self.images))

  def timm_model(self, **extra):
    kw = dict(self.timm_kw, img_size=self.size, **extra)
    return self.timm.create_model(self.timm_name, pretrained=False, num_classes=NUM_CLASSES,
                                  **kw).eval()

  def theirs(self, tmodel):
    torch = self.torch
    with torch.no_grad():
      x = torch.from_numpy(self.images.transpose(0, 3, 1, 2).copy())
      return tmodel(x).numpy()


def check_close(a, b, what):
  diff = float(np.max(np.abs(a - b)))
  print(f"\n[parity] {what}: max |logit diff| = {diff:.3g} (max |logit| {np.max(np.abs(b)):.3g})")
  assert a.shape == b.shape
  assert np.std(b) > 0.05, f"{what}: reference logits are nearly constant; the test is vacuous"
  assert diff <= TOL, f"{what}: max abs logit difference {diff} > {TOL}"
  return diff


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, ref):
  return Pair(request.param, ref)


def test_google_npz_parity(pair, tmp_path):
  """Our random tree -> save_npz -> timm's npz loader vs our load_params: same logits."""
  params = random_params(pair.model)
  path = tmp_path / "vit.npz"
  ck.save_npz(params, path)
  tmodel = pair.timm_model()
  pair.load_npz(tmodel, str(path))
  loaded = ck.load_params(path)
  assert ck.tree_equal(loaded, params)
  check_close(pair.ours(loaded), pair.theirs(tmodel), f"npz {pair.name} depth 2")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_state_dict_parity(pair, fmt, tmp_path):
  """timm state dict (random weights) saved as .safetensors / .pth -> load_params."""
  torch = pair.torch
  tmodel = randomize_torch(torch, pair.timm_model(), seed=1)
  state = {k: v.contiguous() for k, v in tmodel.state_dict().items()}
  path = tmp_path / f"vit.{fmt}"
  if fmt == "safetensors":
    from safetensors.torch import save_file
    save_file(state, str(path))
  else:
    torch.save({"model": state, "epoch": 3}, path)  # DeiT / MAE wrapper layout
  heads = None if pair.heads in (6, 12) else pair.heads  # S/B: inferred from the width
  loaded, info = ck.read_checkpoint(path, num_heads=heads)
  assert info.format == ("safetensors" if fmt == "safetensors" else "torch")
  merged, report = ck.merge_pretrained(pair.init(), loaded)
  assert not report.kept_from_init and not report.ignored
  check_close(pair.ours(merged), pair.theirs(tmodel), f"{fmt} {pair.name} depth 2")


def test_round_trip_timm_to_ours_to_timm(pair, tmp_path):
  """timm weights -> our tree -> save_npz -> timm's npz loader: bit-identical state dict."""
  torch = pair.torch
  tmodel = randomize_torch(torch, pair.timm_model(), seed=2)
  state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  flat, _, _ = ck.convert_torch_state(state, num_heads=pair.heads)
  ck.save_npz(tree_util.unflatten(flat), tmp_path / "rt.npz")
  fresh = pair.timm_model()
  pair.load_npz(fresh, str(tmp_path / "rt.npz"))
  for k, v in fresh.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
  np.testing.assert_array_equal(pair.theirs(fresh), pair.theirs(tmodel))


@pytest.mark.parametrize("name", ["tiny", "S/16"])
def test_export_merged_lora_read_by_timm(ref, name, tmp_path):
  """A LoRA model (all six projections, B != 0) exported merged equals timm's logits."""
  base = Pair(name, ref)
  lora_model = build_vit(*base.args, num_classes=NUM_CLASSES,
                         peft=PeftConfig(lora=LoraConfig(rank=3)), **base.kw)
  params = random_params(lora_model, seed=3)
  assert sum("/lora/" in k for k in tree_util.flatten(params)) == 2 * 6 * 2
  unmerged = base.ours(params, apply=jax.jit(lora_model.apply))
  remaining = ck.export_npz(params, tmp_path / "merged.npz", merge_lora=True)
  assert remaining == []
  tmodel = base.timm_model()
  base.load_npz(tmodel, str(tmp_path / "merged.npz"))
  check_close(unmerged, base.theirs(tmodel), f"merged-LoRA export {name}")
  # And the exported file loads back into the plain model with the same logits.
  check_close(base.ours(ck.load_params(tmp_path / "merged.npz")), base.theirs(tmodel),
              f"merged-LoRA export reloaded {name}")


def test_posemb_resize_matches_timm_convention(ref, tmp_path):
  """32 px npz loaded at 48 px: method='timm' reproduces timm's own resize in its loader."""
  small = Pair("tiny", ref)
  params = random_params(small.model, seed=4)
  ck.save_npz(params, tmp_path / "p32.npz")
  big = Pair("tiny", ref, image_size=48)
  tmodel = big.timm_model()
  big.load_npz(tmodel, str(tmp_path / "p32.npz"))
  merged, report = ck.load_pretrained(big.init(), tmp_path / "p32.npz", posemb_resize="timm")
  assert list(report.resized) == ["Transformer/posembed_input/pos_embedding"]
  check_close(big.ours(merged), big.theirs(tmodel), "posemb 4x4 -> 6x6 (timm convention)")


def test_bfloat16_safetensors(ref, tmp_path):
  torch = ref[0]
  pair = Pair("tiny", ref)
  tmodel = randomize_torch(torch, pair.timm_model(), seed=5)
  from safetensors.torch import save_file
  save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tmodel.state_dict().items()},
            str(tmp_path / "bf16.safetensors"))
  with torch.no_grad():
    for p in tmodel.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  loaded = ck.load_params(tmp_path / "bf16.safetensors", num_heads=4)
  assert str(loaded["cls"].dtype) == "bfloat16"
  merged, report = ck.merge_pretrained(pair.init(), loaded)
  assert report.cast["cls"] == ("bfloat16", "float32")
  check_close(pair.ours(merged), pair.theirs(tmodel), "bf16 safetensors")


def test_mae_checkpoint_extras_and_fc_norm(ref, tmp_path):
  """MAE pre-training files: decoder / mask token dropped and reported, no head."""
  torch = ref[0]
  pair = Pair("tiny", ref)
  tmodel = randomize_torch(torch, pair.timm_model(), seed=6)
  state = {k: v for k, v in tmodel.state_dict().items() if not k.startswith("head.")}
  extras = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
            "decoder_pos_embed": torch.zeros(1, 17, 32),
            "decoder_blocks.0.norm1.weight": torch.ones(32),
            "decoder_pred.weight": torch.randn(192, 32)}
  torch.save({"model": {**state, **extras}}, tmp_path / "mae_pretrain.pth")
  loaded, info = ck.read_checkpoint(tmp_path / "mae_pretrain.pth", num_heads=4)
  assert set(info.ignored) == set(extras)
  assert "head" not in loaded
  merged, report = ck.load_pretrained(pair.init(), tmp_path / "mae_pretrain.pth",
                                      init_only=["head/.*"])
  assert sorted(report.kept_from_init) == ["head/bias", "head/kernel"]
  assert "decoder_embed.weight" in report.ignored
  feats = pair.model.apply({"params": merged}, pair.images, features=True)
  with torch.no_grad():
    ref_tokens = tmodel.forward_features(
        torch.from_numpy(pair.images.transpose(0, 3, 1, 2).copy())).numpy()
  check_close(np.asarray(feats["tokens"]), ref_tokens, "MAE encoder tokens (final norm)")

  # Global-pool (fc_norm) fine-tuned checkpoints: not representable -> clear error or drop.
  gp = {k: v for k, v in state.items() if not k.startswith("norm.")}
  gp.update({"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64)})
  torch.save(gp, tmp_path / "mae_finetuned.pth")
  with pytest.raises(ck.CheckpointError, match=r"mae_finetuned.pth: has 'fc_norm.weight'.*"
                     r"fc_norm='drop'"):
    ck.load_params(tmp_path / "mae_finetuned.pth", num_heads=4)
  loaded, info = ck.read_checkpoint(tmp_path / "mae_finetuned.pth", num_heads=4, fc_norm="drop")
  assert set(info.ignored) == {"fc_norm.weight", "fc_norm.bias"}
  assert "encoder_norm" not in loaded["Transformer"]


def test_bad_torch_files(ref, tmp_path):
  torch = ref[0]
  pair = Pair("tiny", ref)
  state = pair.timm_model().state_dict()
  good = tmp_path / "good.pth"
  torch.save(state, good)
  blob = good.read_bytes()
  (tmp_path / "truncated.pth").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ck.CheckpointError, match=r"truncated.pth: cannot read as a PyTorch "
                     r"checkpoint \(truncated or corrupt\?\)"):
    ck.load_params(tmp_path / "truncated.pth", num_heads=4)
  # Arbitrary objects are refused (weights_only), never unpickled.
  torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pth")
  with pytest.raises(ck.CheckpointError, match="args.pth: .*re-save only the state dict"):
    ck.load_params(tmp_path / "args.pth", num_heads=4)
  torch.save(torch.zeros(3), tmp_path / "tensor.pt")
  with pytest.raises(ck.CheckpointError, match="tensor.pt: expected a state dict"):
    ck.load_params(tmp_path / "tensor.pt")
  # A wrong-architecture state dict names its offending keys.
  bad = dict(state)
  bad["blocks.0.ls1.gamma"] = torch.ones(64)
  torch.save(bad, tmp_path / "layerscale.pth")
  with pytest.raises(ck.CheckpointError, match=r"layerscale.pth: 1 state-dict entries .*"
                     r"blocks.0.ls1.gamma"):
    ck.load_params(tmp_path / "layerscale.pth", num_heads=4)
  # A file that loads but does not fit the model: merge names the key and the file.
  with pytest.raises(ck.CheckpointError, match=r"(?s)good.pth: .*head/kernel: checkpoint "
                     r"\(64, 10\) vs model \(64, 5\)"):
    ck.load_pretrained(pair.init(build_vit(None, num_classes=5, **pair.kw)), good)
