"""Trainable selection, LR schedules and optimizers against timm, torch and NumPy references."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idat_jax.training import optim
from idat_jax.training import schedules
from idat_jax.training import trainable as tl

# ---------------------------------------------------------------------------------------------
# Schedules.

IDAT_SCHED = dict(t_initial=100, warmup_epochs=10, warmup_lr=1e-7, min_lr=1e-8,
                  warmup_prefix=False, cycle_limit=1)


def _timm_epoch_lrs(base_lr, num_epochs=110):
  """LR of each epoch as timm's train loop sees it: set at construction, then step(epoch + 1)."""
  import timm.scheduler  # A missing timm must fail this test: CI installs it.
  import torch

  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=base_lr)
  sched = timm.scheduler.CosineLRScheduler(
      opt, t_initial=100, lr_min=1e-8, warmup_t=10, warmup_lr_init=1e-7, cycle_limit=1,
      warmup_prefix=False, t_in_epochs=True)
  lrs = []
  for epoch in range(num_epochs):
    lrs.append(opt.param_groups[0]["lr"])
    for it in range(3):  # Per-iteration updates are no-ops with t_in_epochs=True.
      sched.step_update(num_updates=epoch * 3 + it + 1)
    sched.step(epoch + 1)
  assert lrs == [sched._get_lr(e)[0] for e in range(num_epochs)]
  return np.array(lrs)


@pytest.mark.parametrize("base_lr", [5e-3, 1e-3])
def test_timm_cosine_matches_timm_every_epoch(base_lr):
  ref = _timm_epoch_lrs(base_lr)
  ours = schedules.timm_cosine_epoch_lrs(110, base_lr, **IDAT_SCHED)
  np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=0)
  # The jittable per-epoch step schedule carries the same values (float32).
  spe = 15
  fn = jax.jit(schedules.timm_cosine_schedule(base_lr, steps_per_epoch=spe, num_epochs=110,
                                              **IDAT_SCHED))
  got = np.array([fn(e * spe + spe - 1) for e in range(110)])
  np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_timm_cosine_literal_values():
  lr = lambda e: schedules.timm_cosine_epoch_lr(e, 5e-3, **IDAT_SCHED)  # noqa: E731
  expected = {0: 1e-7, 1: 5.0009e-4, 9: 4.5e-3, 10: 4.8776e-3, 50: 2.5e-3, 99: 1.2436e-6}
  for e, v in expected.items():
    assert lr(e) == pytest.approx(v, rel=1e-4), e
  assert lr(0) == 1e-7
  for e in range(100, 110):
    assert lr(e) == 1e-8
  # warmup_prefix=False: the cosine uses the absolute epoch, not e - 10.
  assert lr(10) == pytest.approx(1e-8 + 0.5 * (5e-3 - 1e-8) * (1 + math.cos(math.pi * 0.1)))


def test_per_epoch_schedule_piecewise_constant_and_jittable():
  epoch_lrs = [0.1, 0.2, 0.05, 0.01]
  fn = schedules.per_epoch_schedule(epoch_lrs, steps_per_epoch=5)
  jfn = jax.jit(fn)
  for step in range(30):
    want = np.float32(epoch_lrs[min(step // 5, 3)])
    assert float(fn(step)) == want
    assert float(jfn(jnp.asarray(step, jnp.int32))) == want
  # Boundaries: last step of an epoch vs first step of the next.
  assert float(jfn(4)) == np.float32(0.1) and float(jfn(5)) == np.float32(0.2)
  assert float(jfn(14)) == np.float32(0.05) and float(jfn(15)) == np.float32(0.01)
  # From a function of the epoch, vectorised over steps.
  fn2 = schedules.per_epoch_schedule(lambda e: 0.5 ** e, steps_per_epoch=3, num_epochs=4)
  np.testing.assert_array_equal(np.asarray(jax.vmap(fn2)(jnp.arange(12))),
                                np.float32([1, 1, 1, .5, .5, .5, .25, .25, .25, .125, .125, .125]))
  with pytest.raises(ValueError, match="num_epochs"):
    schedules.per_epoch_schedule(lambda e: 1.0, steps_per_epoch=3)


def test_timm_cosine_per_step_variant():
  spe = 10
  fn = jax.jit(schedules.timm_cosine_step_schedule(5e-3, steps_per_epoch=spe, **IDAT_SCHED))
  for e in [0, 1, 5, 10, 37, 99, 100, 105]:
    assert float(fn(e * spe)) == pytest.approx(
        schedules.timm_cosine_epoch_lr(e, 5e-3, **IDAT_SCHED), rel=1e-5)
  # Between epochs the LR moves every step (fractional epoch 20.5).
  mid = 1e-8 + 0.5 * (5e-3 - 1e-8) * (1 + math.cos(math.pi * 20.5 / 100))
  assert float(fn(205)) == pytest.approx(mid, rel=1e-5)
  assert float(fn(15)) == pytest.approx(1e-7 + 1.5 * (5e-3 - 1e-7) / 10, rel=1e-5)
  per_step = schedules.timm_cosine_schedule(5e-3, steps_per_epoch=spe, num_epochs=110,
                                            per_step=True, **IDAT_SCHED)
  assert float(per_step(205)) == pytest.approx(mid, rel=1e-5)


def test_half_cycle_cosine_hand_values():
  kw = dict(epochs=10, warmup_epochs=2, steps_per_epoch=12)
  fn = jax.jit(schedules.half_cycle_cosine(4e-3, **kw))
  hand = {0: 0.0, 6: 1e-3, 12: 2e-3, 24: 4e-3, 48: 2e-3 * (1 + math.sqrt(0.5)), 72: 2e-3,
          120: 0.0, 500: 0.0}
  for step, v in hand.items():
    assert float(fn(step)) == pytest.approx(v, rel=1e-6, abs=1e-12), step
  lin = jax.jit(schedules.half_cycle_cosine(4e-3, linear=True, min_lr=1e-4, **kw))
  assert float(lin(48)) == pytest.approx(1e-4 + 3.9e-3 * 0.75, rel=1e-6)
  assert float(lin(120)) == pytest.approx(1e-4, rel=1e-6)
  mn = schedules.half_cycle_cosine(4e-3, min_lr=1e-5, **kw)
  assert float(mn(72)) == pytest.approx(1e-5 + (4e-3 - 1e-5) * 0.5, rel=1e-6)
  # Python helper agrees with the jnp schedule.
  for step in range(0, 121, 7):
    assert float(fn(step)) == pytest.approx(
        schedules.half_cycle_cosine_lr(step / 12, 4e-3, epochs=10, warmup_epochs=2),
        rel=1e-5, abs=1e-12)
  # MAE with accumulation: 99 micro-batches, 8 per step -> 12 steps/epoch at t = e + 8k/99.
  acc = schedules.half_cycle_cosine(4e-3, epochs=10, warmup_epochs=2, steps_per_epoch=12,
                                    accum_steps=8, micro_batches_per_epoch=99)
  assert float(acc(12 * 3 + 5)) == pytest.approx(
      schedules.half_cycle_cosine_lr(3 + 40 / 99, 4e-3, epochs=10, warmup_epochs=2), rel=1e-6)
  with pytest.raises(ValueError, match="micro-batches"):
    schedules.half_cycle_cosine(4e-3, epochs=10, warmup_epochs=2, steps_per_epoch=13,
                                accum_steps=8, micro_batches_per_epoch=99)


# ---------------------------------------------------------------------------------------------
# Trainable selection.


def _toy_params():
  rng = np.random.default_rng(0)
  z = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731

  def block():
    return {"LayerNorm_0": {"scale": z(8), "bias": z(8)},
            "MlpBlock_3": {"Dense_0": {"kernel": z(8, 16), "bias": z(16)}},
            "adapter": {"down": {"kernel": z(8, 4), "bias": z(4)}}}

  return {
      "embedding": {"kernel": z(4, 4, 3, 8), "bias": z(8)},
      "cls": z(1, 1, 8),
      "Transformer": {"posembed_input": {"pos_embedding": z(1, 5, 8)},
                      "encoderblock_0": block(), "encoderblock_1": block(),
                      "encoder_norm": {"scale": z(8), "bias": z(8)}},
      "head": {"kernel": z(8, 3), "bias": z(3)},
  }


RULES = [(".*/adapter/.*", True), ("head/.*", True), (".*", False)]


def test_rules_first_match_wins_and_full_match():
  params = _toy_params()
  vals = tl.match_rules(params, [("head/kernel", "a"), ("head/.*", "b"), (".*", "c")])
  assert vals["head"] == {"kernel": "a", "bias": "b"}
  assert vals["embedding"] == {"kernel": "c", "bias": "c"}
  # Full match: "head" alone does not match "head/kernel".
  with pytest.raises(ValueError, match="head/kernel") as err:
    tl.trainable_mask(params, [("head", True), ("(embedding|cls|Transformer)/?.*", False)])
  assert "head/bias" in str(err.value) and "2 parameter(s)" in str(err.value)
  mask = tl.trainable_mask(params, RULES)
  assert mask["Transformer"]["encoderblock_1"]["adapter"]["down"]["kernel"] is True
  assert mask["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"] is False
  assert mask["cls"] is False and mask["head"]["bias"] is True


def test_rules_errors_and_unused_warning(caplog):
  params = _toy_params()
  with pytest.raises(ValueError, match="invalid regex"):
    tl.match_rules(params, [("head/(", True), (".*", False)])
  with pytest.raises(ValueError, match="must map to a bool"):
    tl.trainable_mask(params, [(".*", "yes")])
  many = tl.flatten(params)
  with pytest.raises(ValueError, match=r"and \d+ more"):
    tl.match_rules(params, [("nothing", True)])
  assert len(many) > 10
  with caplog.at_level(logging.WARNING):
    tl.trainable_mask(params, [("lora/.*", True)] + RULES)
  assert any("lora/.*" in r.getMessage() for r in caplog.records)


def test_partition_combine_round_trip():
  params = _toy_params()
  mask = tl.trainable_mask(params, RULES)
  tr, fr = tl.partition(params, mask)
  assert set(tl.flatten(tr)) == {
      f"Transformer/encoderblock_{i}/adapter/down/{leaf}" for i in (0, 1)
      for leaf in ("kernel", "bias")} | {"head/kernel", "head/bias"}
  assert "head" not in fr and "embedding" not in tr  # Empty subtrees pruned.
  assert "adapter" not in fr["Transformer"]["encoderblock_0"]
  back = tl.combine(tr, fr)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(back),
                              jax.tree_util.tree_leaves_with_path(params)):
    assert pa == pb and a is b
  with pytest.raises(ValueError, match="in both trees"):
    tl.combine(tr, params)
  with pytest.raises(ValueError, match="does not match"):
    tl.partition(params, {"head": {"kernel": True}})


def test_grad_and_optimizer_state_only_on_trainable():
  params = _toy_params()
  tr, fr = tl.partition(params, tl.trainable_mask(params, RULES))
  x = jnp.ones((2, 8))

  def loss(trainable, frozen):
    p = tl.combine(trainable, frozen)
    h = x
    for i in range(2):
      b = p["Transformer"][f"encoderblock_{i}"]
      h = h @ b["MlpBlock_3"]["Dense_0"]["kernel"][:, :8]
      a = b["adapter"]["down"]
      h = h + jnp.tanh(h @ a["kernel"] + a["bias"]).sum(-1, keepdims=True)
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)

  tx = optim.adamw(1e-2, weight_decay=0.1)
  state = tx.init(tr)
  state_names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state)}
  assert not any("Dense_0" in n or "embedding" in n or "LayerNorm" in n for n in state_names)
  n_state = sum(x.size for x in jax.tree.leaves(state))
  assert n_state == 2 * tl.count_params(tr) + 1  # mu, nu and the count.

  @jax.jit
  def step(tr, state):
    g = jax.grad(loss)(tr, fr)
    upd, state = tx.update(g, state, tr)
    return optax.apply_updates(tr, upd), state, g

  new_tr, _, g = step(tr, state)
  assert jax.tree.structure(g) == jax.tree.structure(tr)
  assert all(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g))
  assert not np.allclose(new_tr["head"]["kernel"], tr["head"]["kernel"])


def test_parameter_report_counts():
  params = _toy_params()
  mask = tl.trainable_mask(params, RULES)
  counts = tl.parameter_counts(params, mask)
  assert counts == {
      "embedding": (0, 392), "cls": (0, 8), "Transformer/posembed_input": (0, 40),
      "Transformer/encoderblock_*": (0, 320), "adapter": (72, 72),
      "Transformer/encoder_norm": (0, 16), "head": (27, 27)}
  report = tl.parameter_report(params, mask, "toy")
  assert report.splitlines()[-1] == "toy: trainable 99 / total 875 (11.314%)"
  assert any(line.split() == ["adapter", "72", "72"] for line in report.splitlines())
  assert tl.count_params(params) == 875
  shapes = jax.eval_shape(lambda: params)  # Works on shape structs too.
  assert tl.count_params(shapes) == 875


# ---------------------------------------------------------------------------------------------
# Optimizers.


def test_weight_decay_mask_rules():
  params = _toy_params()
  m = tl.flatten(optim.weight_decay_mask(params))
  assert m["embedding/kernel"] and m["head/kernel"]
  assert m["Transformer/encoderblock_0/adapter/down/kernel"]
  assert not m["cls"] and not m["Transformer/posembed_input/pos_embedding"]
  assert not m["head/bias"] and not m["Transformer/encoder_norm/scale"]
  mae = tl.flatten(optim.weight_decay_mask(params, "mae"))
  assert mae["cls"] and mae["Transformer/posembed_input/pos_embedding"] and not mae["head/bias"]
  rx = tl.flatten(optim.weight_decay_mask(params, ".*/kernel"))
  assert sum(rx.values()) == 6 and not rx["cls"]
  with pytest.raises(ValueError, match="valid regex"):
    optim.weight_decay_mask(params, "(")


def _compare_adamw_with_torch(dtype):
  import torch

  rng = np.random.default_rng(1)
  init = {"adapter": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))},
          "head": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
          "cls": rng.normal(size=(1, 1, 4))}
  init = jax.tree.map(lambda a: a.astype(dtype), init)
  grads = [jax.tree.map(lambda a: rng.normal(size=a.shape).astype(dtype), init)
           for _ in range(6)]
  epoch_lrs = [1e-2, 5e-3, 2e-3]
  lr_of_step = lambda s: epoch_lrs[s // 2]  # noqa: E731
  wd = 0.1

  names = list(tl.flatten(init))
  tparams = {n: torch.nn.Parameter(torch.tensor(tl.flatten(init)[n])) for n in names}
  decay = [tparams[n] for n in names if tparams[n].ndim > 1 and n != "cls"]
  no_decay = [tparams[n] for n in names if tparams[n].ndim <= 1 or n == "cls"]
  assert len(decay) == 2 and len(no_decay) == 3
  topt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                            {"params": decay, "weight_decay": wd}],
                           lr=1.0, betas=(0.9, 0.999), eps=1e-8)
  for s, g in enumerate(grads):
    for group in topt.param_groups:
      group["lr"] = lr_of_step(s)
    for n in names:
      tparams[n].grad = torch.tensor(tl.flatten(g)[n])
    topt.step()

  tx = optim.adamw(schedules.per_epoch_schedule(epoch_lrs, 2), b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=wd, decay_mask="torch")
  params = jax.tree.map(jnp.asarray, init)
  state = tx.init(params)
  upd_fn = jax.jit(tx.update)
  for g in grads:
    upd, state = upd_fn(g, state, params)
    params = optax.apply_updates(params, upd)
  flat = tl.flatten(params)
  for n in names:
    ours, ref = np.asarray(flat[n]), tparams[n].detach().numpy()
    assert ours.dtype == ref.dtype == dtype
    if dtype == np.float64:
      np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0, err_msg=n)
    else:  # float32: relative to the tensor's scale (entries near 0 carry O(1) rounding).
      assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max(), n

  # The check is sensitive: decaying the bias too gives a different result.
  tx_all = optim.adamw(schedules.per_epoch_schedule(epoch_lrs, 2), weight_decay=wd,
                       decay_mask="all")
  p2 = jax.tree.map(jnp.asarray, init)
  st2 = tx_all.init(p2)
  for g in grads:
    upd, st2 = tx_all.update(g, st2, p2)
    p2 = optax.apply_updates(p2, upd)
  assert np.abs(np.asarray(p2["head"]["bias"]) - tparams["head/bias"].detach().numpy()).max() > 1e-5


@pytest.mark.slow  # against torch.optim.AdamW
def test_adamw_matches_torch_float32():
  _compare_adamw_with_torch(np.float32)


@pytest.mark.slow  # against torch.optim.AdamW
def test_adamw_matches_torch_float64():
  with jax.enable_x64(True):
    _compare_adamw_with_torch(np.float64)


def _numpy_lars(params, grads_seq, lrs, momentum, wd, trust):
  p = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k in p:
      g = grads[k].astype(np.float64)
      if p[k].ndim > 1:
        g = g + wd * p[k]
        pn, gn = np.linalg.norm(p[k]), np.linalg.norm(g)
        if pn > 0 and gn > 0:
          g = g * (trust * pn / gn)
      mu[k] = momentum * mu[k] + g
      p[k] = p[k] - lr * mu[k]
  return p


def test_lars_matches_numpy_moco_v3():
  rng = np.random.default_rng(2)
  params = {"kernel": rng.normal(size=(6, 3)).astype(np.float32),
            "zero_kernel": np.zeros((3, 2), np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(5)]
  lrs = [0.2, 0.1, 0.05, 0.4, 0.3]  # A changing LR separates MoCo-v3 from optax.lars.
  ref = _numpy_lars(params, grads_seq, lrs, momentum=0.9, wd=0.05, trust=0.001)

  tx = optim.lars(lambda count: jnp.asarray(lrs)[count], momentum=0.9, weight_decay=0.05,
                  trust_coefficient=0.001)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    upd, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, upd)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert not np.allclose(ref["zero_kernel"], 0)  # ||p|| = 0 -> ratio 1, then it moves.


def test_accumulation_equals_mean_gradient_step():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  micro = [[jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
            for _ in range(8)] for _ in range(2)]
  sched = lambda count: 0.1 / (1.0 + count)  # noqa: E731  Counts optimizer updates.
  make = lambda: optim.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.05)  # noqa: E731

  acc_tx = optim.with_accumulation(make(), 8)
  p_acc, st = params, acc_tx.init(params)
  upd_fn = jax.jit(acc_tx.update)
  for window in micro:
    for i, g in enumerate(window):
      before = p_acc
      upd, st = upd_fn(g, st, p_acc)
      p_acc = optax.apply_updates(p_acc, upd)
      if i < 7:
        for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(before)):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  tx = make()
  p_ref, st_ref = params, tx.init(params)
  for window in micro:
    mean = jax.tree.map(lambda *gs: sum(gs) / len(gs), *window)
    upd, st_ref = tx.update(mean, st_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, upd)
  for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert optim.with_accumulation(tx, 1) is tx
