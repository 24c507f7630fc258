"""The WeCoLoRA linear probe's head against the reference (issue 11, items 1 and 4).

* BatchNorm1d(affine=False, eps=1e-6, momentum=0.1) of torch, run for several training steps:
  the same outputs, running mean and *unbiased* running variance, and the same eval outputs.
* The head's init is timm's trunc_normal_(std=0.01): untruncated N(0, 0.01^2) in effect.
* What each probe / distillation method reports about itself (``describe``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from idat_jax import config_lib
from idat_jax.methods import build_method
from idat_jax.methods.wecolora import ProbeBatchNorm, ProbeHead

DIM = 24


def _torch_bn():
  return torch.nn.BatchNorm1d(DIM, affine=False, eps=1e-6, momentum=0.1).double()


@pytest.mark.parametrize("batch", [2, 5, 64])
def test_probe_batchnorm_matches_torch_batchnorm1d(batch):
  rng = np.random.default_rng(batch)
  bn = ProbeBatchNorm()
  x0 = rng.standard_normal((batch, DIM)).astype(np.float32)
  variables = bn.init(jax.random.key(0), jnp.asarray(x0))
  ref = _torch_bn()
  ref.train()
  step = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
  for i in range(6):
    # Features with a scale and offset per channel, as a backbone's class token has.
    x = (rng.standard_normal((batch, DIM)) * rng.uniform(0.2, 3.0, DIM)
         + rng.uniform(-2, 2, DIM)).astype(np.float32)
    out, updated = step(variables, jnp.asarray(x))
    variables = {"batch_stats": updated["batch_stats"]}
    want = ref(torch.from_numpy(x.astype(np.float64))).numpy()
    # float32 vs float64: at batch 2 a channel's two values can nearly coincide, and then
    # (x - mean) / sqrt(var + eps) loses ~1e-4 to cancellation in either implementation.
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4 if batch == 2 else 2e-5, rtol=0)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), ref.running_mean.numpy(), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(stats["var"]), ref.running_var.numpy(), rtol=1e-6)
  ref.eval()
  x = rng.standard_normal((7, DIM)).astype(np.float32) * 2
  got = np.asarray(bn.apply(variables, jnp.asarray(x), train=False))
  want = ref(torch.from_numpy(x.astype(np.float64))).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6 * max(1.0, np.abs(want).max()), rtol=0)


def test_running_variance_is_unbiased_not_flax_default():
  """The fact that separates the two rules: one step from var=1 at batch n."""
  x = jnp.asarray([[0.0], [2.0]])  # biased var 1, unbiased var 2
  bn = ProbeBatchNorm()
  variables = bn.init(jax.random.key(0), x)
  _, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  assert float(updated["batch_stats"]["var"][0]) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
  assert float(updated["batch_stats"]["mean"][0]) == pytest.approx(0.1 * 1.0)


def test_probe_batchnorm_refuses_a_batch_of_one():
  bn = ProbeBatchNorm()
  x = jnp.ones((1, DIM))
  variables = bn.init(jax.random.key(0), jnp.ones((2, DIM)))
  with pytest.raises(ValueError, match="batch of at least 2"):
    bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_head_init_is_timm_trunc_normal_std_001():
  head = ProbeHead(num_classes=1000)
  variables = head.init(jax.random.key(0), jnp.zeros((2, 768)))
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  assert np.all(np.asarray(variables["params"]["head"]["bias"]) == 0)
  # 768k draws: the sample std of N(0, 0.01^2) is within 0.3% of 0.01; flax's default
  # truncation at +-2 std would give 0.0088 and no value beyond 0.02.
  assert w.std() == pytest.approx(0.01, rel=3e-3)
  assert abs(w.mean()) < 1e-4
  beyond = np.mean(np.abs(w) > 0.02)
  assert beyond == pytest.approx(0.0455, abs=0.003)  # P(|z| > 2) of a normal
  assert np.abs(w).max() < 2.0


# ---------------------------------------------------------------------------------------------
# describe(): what each run reports about itself in its summary and results.csv.

def _config_module(name):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg,backbone,reduction", [
    ("r=1", "teacher", 1), ("r=2", "copied", 2), ("r=3,student_run=runs/weco/r3", "distilled", 3)])
def test_probe_describes_its_backbone(arg, backbone, reduction):
  c = _config_module("wecolora_linprobe").get_config(arg)
  method = build_method(c)
  facts = method.describe()
  assert facts["backbone"] == backbone and facts["reduction"] == reduction
  assert facts["student_run"] == ("runs/weco/r3" if backbone == "distilled" else "")
  assert facts["task"] == c.data.task
  assert "tuning" not in facts  # a probe has no tuning mode of the student
  method.train_examples = 123
  assert method.describe()["train_images"] == 123


def test_distillation_describes_its_data():
  c = _config_module("wecolora_distill").get_config("r=3,ratio=0.1,student=weco_kd")
  c.data.root = "/data/imagenet/train"
  method = build_method(c)
  facts = method.describe()
  assert facts["data"] == "/data/imagenet/train" and facts["few_shot_ratio"] == 0.1
  assert (facts["student"], facts["reduction"]) == ("weco_kd", 3)
  assert "train_images" not in facts and "tuning" not in facts
  method.train_examples = 12811
  assert method.describe()["train_images"] == 12811
  lora = build_method(_config_module("wecolora_distill").get_config("lora=plain,rank=64"))
  assert (lora.describe()["lora_rank"], lora.describe()["lora_targets"]) == (64, "plain")


def test_supervised_default_description():
  c = config_lib.base_config()
  c.method = "supervised"
  c.data.task = "dtd"
  assert build_method(c).describe() == {"task": "dtd", "tuning": "gist_seq_adapter"}


# ---------------------------------------------------------------------------------------------
# Multi-label loss, streamed vs cached probe inputs, data-set selection in the configs.

def test_bce_with_logits_matches_torch():
  from idat_jax.methods import losses
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((16, 15)).astype(np.float32) * 4
  targets = (rng.random((16, 15)) < 0.3).astype(np.float32)
  want = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits), torch.from_numpy(targets))
  got = losses.binary_cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(targets))
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def _tiny_probe(tmp_path, backend="image_folder", transform="direct"):
  from idat_jax import checkpoints as ck
  from idat_jax.models import build_vit
  from vit_testing import random_params
  arch = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
  path = str(tmp_path / "teacher.npz")
  ck.save_npz(random_params(build_vit(None, 0, image_size=16, **arch), seed=0), path)
  c = config_lib.base_config()
  c.method = "linear_probe"
  c.data.backend = backend
  c.data.image_size = 16
  c.data.num_classes = 4
  c.models.teacher = config_lib.model_config("custom", path, "full")
  for k, v in arch.items():
    c.models.teacher[k] = v
  c.probe.update(dict(reduction=1, transform=transform))
  return c


@pytest.mark.parametrize("backend,transform", [("chestxray", "cxr"), ("image_folder", "direct")])
def test_streamed_loss_equals_cached_feature_loss(tmp_path, backend, transform):
  """The streamed probe (backbone inside the step) computes the loss the cached one does."""
  from idat_jax import train
  from idat_jax import sharding as shd
  method = build_method(_tiny_probe(tmp_path, backend, transform))
  assert method.eval_metric == ("mean_auroc" if backend == "chestxray" else "top1")
  assert (method.features_from is None) == (transform == "cxr")
  params, _, _, extras = train.load_models(method, jax.random.key(0), shd.make_mesh(1))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((6, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray([1, 5, 0, 15, 8, 3] if backend == "chestxray" else [0, 1, 2, 3, 0, 1],
                       jnp.int32)
  feats = method.features(params, images)
  a, _, ea = method.loss(params, {"image": images, "label": labels}, None, extras)
  b, _, eb = method.loss(params, {"feature": feats, "label": labels}, None, extras)
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  np.testing.assert_allclose(ea["probe"]["batch_stats"]["bn"]["var"],
                             eb["probe"]["batch_stats"]["bn"]["var"],
                             rtol=1e-6)
  np.testing.assert_allclose(method.predict(params, images, ea),
                             method.predict(params, feats, eb), rtol=1e-5, atol=1e-6)
  if backend == "chestxray":  # BCE over the 4 labels of the packed masks
    from idat_jax.data.multilabel_csv import unpack_labels
    probe = method.specs["probe"].module
    logits = probe.apply({"params": params["probe"], **extras["probe"]}, feats, train=True,
                         mutable=["batch_stats"])[0]
    want = torch.nn.BCEWithLogitsLoss()(
        torch.from_numpy(np.array(logits)),
        torch.from_numpy(unpack_labels(np.asarray(labels), 4)))
    assert float(a) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("arg,backend,train,eval_,transform,norm,multi", [
    ("dataset=cifar100", "tfds_images", "train", "test", "resize_crop", "imagenet", False),
    ("dataset=imagenet,root=/d/in", "image_folder", "train", "val", "resize_crop", "imagenet",
     False),
    ("dataset=inat19,root=/d/inat", "image_folder", "train", "val", "resize_crop", "imagenet",
     False),
    ("dataset=resisc45,root=/d/r", "image_folder", "train", "test", "resisc45", "resisc45", False),
    ("dataset=chestxray,root=/d/cxr", "chestxray", "train", "test", "cxr", "chestxray", True),
    ("dataset=csv,root=/d/rsna", "multilabel_csv", "train", "test", "direct", "imagenet", True),
])
def test_linprobe_config_selects_the_data_set(arg, backend, train, eval_, transform, norm, multi):
  c = _config_module("wecolora_linprobe").get_config(arg)
  d = c.data
  assert (d.backend, d.train_split, d.eval_split, c.probe.transform, d.normalization) == \
      (backend, train, eval_, transform, norm)
  method = build_method(c)
  assert method.eval_metric == ("mean_auroc" if multi else "top1")
  assert method.features_from == (None if transform in ("cxr", "resisc45") else "backbone")
  if "root=" in arg:
    assert d.root == arg.split("root=")[1]
  if "resisc45" in arg:
    # Two sides of the stratified split of 'train': the eval split's name must differ.
    assert (d.stratified_split, d.stratified_seed) == (0.1, 0) and d.eval_split != d.train_split


def test_linprobe_few_shot_and_no_augment():
  module = _config_module("wecolora_linprobe")
  c = module.get_config("dataset=imagenet,few_shot=True")
  assert (c.data.few_shot_ratio, c.data.few_shot_seed) == (0.1, 12)
  assert module.get_config("dataset=imagenet").data.few_shot_ratio == 1.0
  c = module.get_config("dataset=chestxray,augment=False")
  assert build_method(c).features_from == "backbone"  # eval transform, cached features


def test_distill_config_alpha_and_root():
  c = _config_module("wecolora_distill").get_config("ratio=0.1,root=/d/imagenet/train")
  assert (c.data.few_shot_ratio, c.data.root) == (0.1, "/d/imagenet/train")


def test_demo_wecolora_stages():
  from idat_jax import demo
  c = demo.demo_config("weco_distill", "/d", pretrained={"large": "/p/large.npz"})
  assert (c.method, c.data.task, c.data.train_split, c.data.augment) == \
      ("wecolora", "digits_0to4", "test", True)
  assert c.models.teacher.checkpoint == "/p/large.npz" and c.wecolora.reduction == 2
  assert build_method(c).student_blocks == 2  # blocks 0 and 2 of the 4-block ViT
  probes = {s: demo.demo_config(s, "/d", pretrained={"large": "/p/large.npz"},
                                student_run="/runs/weco") for s in demo.PROBES}
  assert [(p.probe.reduction, p.probe.student_run) for p in probes.values()] == \
      [(1, ""), (2, ""), (2, "/runs/weco")]
  assert all(p.data.stratified_split == 0.1 and p.data.task == "digits_0to4"
             for p in probes.values())
  assert [build_method(p).describe()["backbone"] for p in probes.values()] == \
      ["teacher", "copied", "distilled"]
  with pytest.raises(ValueError, match="needs student_run"):
    demo.demo_config("probe_distilled", "/d")
