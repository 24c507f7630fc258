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
