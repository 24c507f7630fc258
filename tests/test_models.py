"""ViT model, adapters, LoRA, SSF and tuning rules against hand-written NumPy references."""

import functools
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from idat_jax.checkpoints import merge_lora
from idat_jax.models import (NAMED, NO_PEFT, AdapterConfig, LoraConfig, PeftConfig, build_vit,
                             dummy_images, model_overrides, param_shapes, peft_subtree,
                             trainable_rules)

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)
NUM_CLASSES = 5
ATOL = 1e-5


def tiny(num_classes=NUM_CLASSES, **overrides):
  return build_vit("custom", num_classes, **dict(TINY, **overrides))


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def unflat(mapping):
  return flax.traverse_util.unflatten_dict(mapping, sep="/")


def merged(*trees):
  out = {}
  for tree in trees:
    out.update(flat(tree))
  return unflat(out)


def images(batch=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)


def init(model, seed=0):
  # The "rbg" generator compiles much faster on CPU than threefry; the distributions are the same.
  key = jax.random.key(seed, impl="rbg")
  return model.init(key, dummy_images(model), features=True)["params"]


def run(model, params, imgs, *, train=False, features=False, rngs=None):
  return model.apply({"params": params}, imgs, train=train, features=features, rngs=rngs)


FRESH_RANK, FRESH_ADAPTER_DIM = 64, 64


@functools.lru_cache(maxsize=None)
def fresh_init():
  """One real init (adapter + LoRA + SSF on the tiny model), shared by the init tests."""
  model = tiny(peft=PeftConfig(
      adapter=AdapterConfig(kind="gist_seq_adapter", hidden_dim=FRESH_ADAPTER_DIM),
      lora=LoraConfig(rank=FRESH_RANK), ssf=True))
  return flat(init(model, 3))


def random_model_params(model, seed=1, std=0.15):
  """Random parameters from the shapes alone: scales around 1, everything else around 0."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, leaf in flat(jax.eval_shape(lambda: init(model))).items():
    base = 1.0 if name.endswith("/scale") else 0.0
    out[name] = jnp.asarray(base + std * rng.standard_normal(leaf.shape), jnp.float32)
  return unflat(out)


def trainable_mask(params, rules):
  """Full-match, first-match-wins evaluation of ``(regex, trainable)`` rules."""
  out = {}
  for name in flat(params):
    hit = next((flag for pattern, flag in rules if re.fullmatch(pattern, name)), None)
    assert hit is not None, f"no rule matches {name}"
    out[name] = hit
  return out


def trainable_count(params, rules):
  mask = trainable_mask(params, rules)
  return sum(math.prod(v.shape) for k, v in flat(params).items() if mask[k])


def total_count(params):
  return sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(params))


@functools.lru_cache(maxsize=None)
def shapes(variant, num_classes, mode=None):
  overrides = model_overrides(mode) if mode else {}
  return param_shapes(build_vit(variant, num_classes, **overrides))


# ----------------------------------------------------------------------------------------------
# NumPy reference (float64), written from the block equations of docs/methods.md sections 1, 2
# and 5.


def np_params(params):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)


def np_ssf(y, p):
  if "ssf" in p:
    y = y * p["ssf"]["scale"] + p["ssf"]["shift"]
  return y


def np_layernorm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return np_ssf((x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"], p)


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_dense(x, p, in_dims=1, lora_scale=1.0):
  y = np.tensordot(x, p["kernel"], axes=in_dims) + p["bias"]
  if "lora" in p:
    y = y + lora_scale * np.tensordot(np.tensordot(x, p["lora"]["a"], axes=in_dims),
                                      p["lora"]["b"], axes=1)
  return np_ssf(y, p)


def np_attention(x, p, lora_scale):
  q = np_dense(x, p["query"], lora_scale=lora_scale)  # (B, N, H, Dh)
  k = np_dense(x, p["key"], lora_scale=lora_scale)
  v = np_dense(x, p["value"], lora_scale=lora_scale)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights = weights / weights.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", weights, v)
  return np_dense(o, p["out"], in_dims=2, lora_scale=lora_scale)


def np_mlp(x, p, lora_scale):
  h = np_gelu(np_dense(x, p["Dense_0"], lora_scale=lora_scale))
  return np_dense(h, p["Dense_1"], lora_scale=lora_scale)


def np_adapter(x, p):
  return np_dense(np_gelu(np_dense(x, p["down"])), p["up"])


def np_block(x, p, kind=None, scale=None, lora_scale=1.0, keep_attn=1.0, keep_mlp=1.0):
  """One block; ``keep_*`` are per-sample drop-path multipliers (0 or 1/keep), shape (B,)."""
  keep_attn = np.reshape(keep_attn, (-1, 1, 1))
  keep_mlp = np.reshape(keep_mlp, (-1, 1, 1))
  attn = np_attention(np_layernorm(x, p["LayerNorm_0"]), p["MultiHeadDotProductAttention_1"],
                      lora_scale)
  x1 = x + keep_attn * attn
  if kind == "gist_shared_par_adapter":
    x1 = x1 + scale * np_adapter(x, p["adapter"])
  x2 = x1 + keep_mlp * np_mlp(np_layernorm(x1, p["LayerNorm_2"]), p["MlpBlock_3"], lora_scale)
  if kind in ("gist_shared_par_adapter", "adaptformer"):
    x2 = x2 + scale * np_adapter(x1, p["adapter"])
  elif kind == "gist_seq_adapter":
    x2 = x2 + scale * np_adapter(x2, p["adapter"])
  return x2


def np_embed(imgs, p, pool="token"):
  imgs = np.asarray(imgs, np.float64)
  kernel = p["embedding"]["kernel"]  # (p, p, 3, D), HWIO
  ps = kernel.shape[0]
  b, h, w, c = imgs.shape
  patches = imgs.reshape(b, h // ps, ps, w // ps, ps, c)
  x = np.einsum("bhiwjc,ijcd->bhwd", patches, kernel).reshape(b, -1, kernel.shape[-1])
  x = np_ssf(x + p["embedding"]["bias"], p["embedding"])
  if pool == "token":
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1)
  return x + p["Transformer"]["posembed_input"]["pos_embedding"]


def np_forward(imgs, params, depth, kind=None, scale=None, lora_scale=1.0, pool="token"):
  p = np_params(params)
  x = np_embed(imgs, p, pool)
  blocks = []
  for i in range(depth):
    x = np_block(x, p["Transformer"][f"encoderblock_{i}"], kind, scale, lora_scale)
    blocks.append(x)
  tokens = np_layernorm(x, p["Transformer"]["encoder_norm"])
  pooled = tokens[:, 0] if pool == "token" else tokens.mean(1)
  if "pre_logits" in p:
    pooled = np.tanh(np_dense(pooled, p["pre_logits"]))
  out = dict(blocks=blocks, tokens=tokens, pooled=pooled)
  if "head" in p:
    out["logits"] = np_dense(pooled, p["head"])
  return out


def assert_matches_reference(model, params, imgs, ref, check_plain_call=False):
  out = run(model, params, imgs, features=True)
  assert len(out["blocks"]) == len(ref["blocks"])
  for got, want in zip(out["blocks"], ref["blocks"]):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(out["tokens"]), ref["tokens"], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(out["pooled"]), ref["pooled"], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(out["logits"]), ref["logits"], atol=ATOL, rtol=ATOL)
  if check_plain_call:
    logits = run(model, params, imgs)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(out["logits"]), atol=1e-6, rtol=0)
  return out


# ----------------------------------------------------------------------------------------------
# 1. Forward pass and adapter forms against the reference equations.


@pytest.mark.parametrize("mode,dim,scale,expected_scale", [
    (None, None, None, None),
    ("gist_seq_adapter", 4, None, 1.0),
    ("gist_shared_par_adapter", 4, None, 0.1),
    ("adaptformer", 4, None, 0.1),
    ("gist_seq_adapter", 7, 0.3, 0.3),
    ("gist_shared_par_adapter", 8, 0.5, 0.5),
    ("adaptformer", 6, 2.0, 2.0),
])
def test_forward_matches_numpy_reference(mode, dim, scale, expected_scale):
  overrides = model_overrides(mode, adapter_dim=dim, adapter_scale=scale) if mode else {}
  model = tiny(**overrides)
  params = random_model_params(model)
  if mode:
    assert model.peft.adapter.effective_scale == pytest.approx(expected_scale)
    for i in range(TINY["depth"]):
      block = params["Transformer"][f"encoderblock_{i}"]
      # One adapter per block; the shared-parallel form reuses it for both branches.
      assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                            "MlpBlock_3", "adapter"}
      assert {k: v.shape for k, v in flat(block["adapter"]).items()} == {
          "down/kernel": (32, dim), "down/bias": (dim,),
          "up/kernel": (dim, 32), "up/bias": (32,)}
  else:
    assert not any("adapter" in name for name in flat(params))
  imgs = images(3)
  ref = np_forward(imgs, params, TINY["depth"], mode, expected_scale)
  out = assert_matches_reference(model, params, imgs, ref, check_plain_call=mode is None)
  if mode:
    # The adapter contributes: the same weights without it give a different answer.
    base = np_forward(imgs, params, TINY["depth"])
    assert np.abs(np.asarray(out["blocks"][-1]) - base["blocks"][-1]).max() > 1e-2


def adapter_init_weights():
  p = fresh_init()
  for name, value in p.items():
    if "/adapter/" in name and name.endswith("/bias"):
      np.testing.assert_array_equal(np.asarray(value), 0.0)
  return np.concatenate([np.ravel(v) for k, v in p.items()
                         if "/adapter/" in k and k.endswith("/kernel")])


def test_adapter_init():
  w = adapter_init_weights()
  assert w.size == TINY["depth"] * 2 * TINY["width"] * FRESH_ADAPTER_DIM
  assert abs(w.mean()) < 0.002
  assert 0.01 < w.std() < 0.025
  assert np.abs(w).max() < 0.1


def test_adapter_init_std_matches_reference():
  assert adapter_init_weights().std() == pytest.approx(0.02, rel=0.05)


def test_gap_pool_and_representation_size():
  model = tiny(pool="gap", representation_size=16)
  params = random_model_params(model)
  assert "cls" not in params
  assert params["pre_logits"]["kernel"].shape == (32, 16)
  assert params["head"]["kernel"].shape == (16, NUM_CLASSES)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 32)
  imgs = images(2)
  ref = np_forward(imgs, params, TINY["depth"], pool="gap")
  assert_matches_reference(model, params, imgs, ref)
  token = tiny()
  assert "pre_logits" not in param_shapes(token)


# ----------------------------------------------------------------------------------------------
# 2. Parameter names, shapes and counts (no weights: eval_shape only).


def official_b16_shapes(num_classes):
  d, h, dh, mlp, p = 768, 12, 64, 3072, 16
  out = {
      "embedding/kernel": (p, p, 3, d), "embedding/bias": (d,), "cls": (1, 1, d),
      "Transformer/posembed_input/pos_embedding": (1, 197, d),
      "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
      "head/kernel": (d, num_classes), "head/bias": (num_classes,),
  }
  for i in range(12):
    blk = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      out[f"{blk}/{ln}/scale"] = (d,)
      out[f"{blk}/{ln}/bias"] = (d,)
    att = f"{blk}/MultiHeadDotProductAttention_1"
    for name in ("query", "key", "value"):
      out[f"{att}/{name}/kernel"] = (d, h, dh)
      out[f"{att}/{name}/bias"] = (h, dh)
    out[f"{att}/out/kernel"] = (h, dh, d)
    out[f"{att}/out/bias"] = (d,)
    out[f"{blk}/MlpBlock_3/Dense_0/kernel"] = (d, mlp)
    out[f"{blk}/MlpBlock_3/Dense_0/bias"] = (mlp,)
    out[f"{blk}/MlpBlock_3/Dense_1/kernel"] = (mlp, d)
    out[f"{blk}/MlpBlock_3/Dense_1/bias"] = (d,)
  return out


def test_b16_matches_official_npz_tree():
  got = {k: tuple(v.shape) for k, v in flat(shapes("B/16", 1000)).items()}
  assert got == official_b16_shapes(1000)
  assert all(v.dtype == jnp.float32 for v in flat(shapes("B/16", 1000)).values())


def test_total_parameter_counts():
  assert total_count(shapes("B/16", 1000)) == 86_567_656
  assert total_count(shapes("S/16", 1000)) == 22_050_664


@pytest.mark.parametrize("num_classes", [2, 100, 397])
def test_idat_trainable_counts(num_classes):
  rules = trainable_rules("gist_seq_adapter")
  student = shapes("B/16", num_classes, "gist_seq_adapter")
  teacher = shapes("S/16", num_classes, "gist_seq_adapter")
  assert trainable_count(student, rules) == 82_992 + 769 * num_classes
  assert trainable_count(teacher, rules) == 41_520 + 385 * num_classes
  # The frozen part is exactly the pretrained backbone.
  frozen = total_count(student) - trainable_count(student, rules)
  assert frozen == total_count(shapes("B/16", 1000)) - 769 * 1000


def test_all_adapter_forms_have_the_same_trainable_count():
  counts = {mode: trainable_count(shapes("S/16", 10, mode), trainable_rules(mode))
            for mode in ("gist_seq_adapter", "gist_shared_par_adapter", "adaptformer")}
  assert set(counts.values()) == {41_520 + 385 * 10}


@pytest.mark.parametrize("variant", NAMED)
def test_named_variants(variant):
  expected = {
      "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
      "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120),
  }
  size, patch = variant.split("/")
  width, depth, heads, mlp = expected[size]
  patch = int(patch)
  model = build_vit(variant, 10)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim, model.patch_size) == (
      width, depth, heads, mlp, patch)
  p = flat(shapes(variant, 10))
  assert p["embedding/kernel"].shape == (patch, patch, 3, width)
  n_blocks = len({k.split("/")[1] for k in p if k.startswith("Transformer/encoderblock_")})
  assert n_blocks == depth
  att = f"Transformer/encoderblock_{depth - 1}/MultiHeadDotProductAttention_1"
  assert p[f"{att}/query/kernel"].shape == (width, heads, width // heads)
  assert p[f"{att}/out/kernel"].shape == (heads, width // heads, width)
  assert p["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape == (width, mlp)
  tokens = (224 // patch) ** 2 + 1
  assert p["Transformer/posembed_input/pos_embedding"].shape == (1, tokens, width)


# ----------------------------------------------------------------------------------------------
# 3. LoRA.


def lora_model(targets="enhanced", rank=3, scale=1.0, **kw):
  return tiny(**model_overrides("lora", lora_rank=rank, lora_targets=targets,
                                lora_scale=scale), **kw)


@pytest.mark.parametrize("targets", ["enhanced", "plain"])
def test_lora_zero_b_equals_base_exactly(targets):
  base = tiny()
  base_params = random_model_params(base)
  lora = lora_model(targets, rank=FRESH_RANK)
  wanted = set(flat(param_shapes(lora)))
  fresh = {k: v for k, v in fresh_init().items() if "/lora/" in k and k in wanted}
  assert fresh and set(flat(peft_subtree(unflat(fresh)))) == set(fresh)
  for name, value in fresh.items():
    if name.endswith("/b"):
      np.testing.assert_array_equal(np.asarray(value), 0.0)
    else:
      assert np.abs(np.asarray(value)).max() > 0
  params = merged(base_params, unflat(fresh))
  assert set(flat(params)) == wanted
  imgs = images(3)
  want = run(base, base_params, imgs)
  got = run(lora, params, imgs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("targets,scale", [("enhanced", 1.0), ("plain", 1.0),
                                           (("k", "out", "fc2"), 2.5)])
def test_lora_forward_and_merge(targets, scale):
  lora = lora_model(targets, scale=scale)
  params = random_model_params(lora, seed=5)  # B is now non-zero
  imgs = images(3)
  # Unmerged LoRA model against the reference y = W x + b + scale * B(A x).
  ref = np_forward(imgs, params, TINY["depth"], lora_scale=scale)
  out = assert_matches_reference(lora, params, imgs, ref)
  base = tiny()
  base_params = {k: v for k, v in flat(params).items() if "/lora/" not in k}
  assert np.abs(np.asarray(run(base, unflat(base_params), imgs))
                - np.asarray(out["logits"])).max() > 1e-3
  merged_params = merge_lora(params, scale=scale)
  assert not any("lora" in k for k in flat(merged_params))
  assert set(flat(merged_params)) == set(base_params)
  got = run(base, merged_params, imgs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(out["logits"]), atol=ATOL, rtol=ATOL)


def test_lora_param_shapes():
  d, h, dh, mlp, r = 32, 4, 8, 64, 3
  p = {k: v.shape for k, v in flat(param_shapes(lora_model(rank=r))).items()
       if "/lora/" in k}
  blk = "Transformer/encoderblock_1"
  att = f"{blk}/MultiHeadDotProductAttention_1"
  for name in ("query", "key", "value"):
    assert p[f"{att}/{name}/lora/a"] == (d, r)
    assert p[f"{att}/{name}/lora/b"] == (r, h, dh)
  assert p[f"{att}/out/lora/a"] == (h, dh, r)
  assert p[f"{att}/out/lora/b"] == (r, d)
  assert p[f"{blk}/MlpBlock_3/Dense_0/lora/a"] == (d, r)
  assert p[f"{blk}/MlpBlock_3/Dense_0/lora/b"] == (r, mlp)
  assert p[f"{blk}/MlpBlock_3/Dense_1/lora/a"] == (mlp, r)
  assert p[f"{blk}/MlpBlock_3/Dense_1/lora/b"] == (r, d)
  assert len(p) == 2 * 6 * TINY["depth"]
  per_block = r * (4 * (d + d) + (d + mlp) + (mlp + d))
  assert sum(math.prod(s) for s in p.values()) == per_block * TINY["depth"]
  plain = {k for k in flat(param_shapes(lora_model("plain"))) if "/lora/" in k}
  assert {k.split("/")[-3] for k in plain} == {"query", "value"}
  assert len(plain) == 2 * 2 * TINY["depth"]


def test_lora_a_init_is_kaiming_uniform():
  params = fresh_init()
  d, mlp = TINY["width"], TINY["mlp_dim"]
  fan_in = {"query": d, "key": d, "value": d, "out": d, "Dense_0": d, "Dense_1": mlp}
  assert sum(k.endswith("/lora/a") for k in params) == 6 * TINY["depth"]
  for name, a in params.items():
    if name.endswith("/lora/a"):
      bound = 1.0 / math.sqrt(fan_in[name.split("/")[-3]])
      a = np.asarray(a)
      assert np.abs(a).max() <= bound
      assert np.abs(a).max() > 0.9 * bound
  a = np.asarray(params["Transformer/encoderblock_0/MlpBlock_3/Dense_1/lora/a"])
  assert a.shape == (mlp, FRESH_RANK)
  bound = 1.0 / math.sqrt(mlp)
  assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
  assert abs(a.mean()) < 0.05 * bound


def test_lora_config():
  assert LoraConfig.from_alpha(8, 16).scale == 2.0
  assert LoraConfig.from_alpha(4, 4, targets=["q", "v"]) == LoraConfig(4, ("q", "v"), 1.0)
  assert LoraConfig().scale == 1.0
  assert model_overrides("lora")["peft"].lora.targets == ("q", "k", "v", "out", "fc1", "fc2")
  assert model_overrides("lora", lora_targets="plain")["peft"].lora.targets == ("q", "v")
  with pytest.raises(ValueError, match="rank"):
    LoraConfig(rank=0)
  with pytest.raises(ValueError, match="targets"):
    LoraConfig(targets=("q", "qkv"))
  with pytest.raises(ValueError, match="targets"):
    LoraConfig(targets=())
  with pytest.raises(ValueError, match="preset"):
    model_overrides("lora", lora_targets="everything")
  with pytest.raises(ValueError, match="adapter kind"):
    AdapterConfig("lora_adapter")
  with pytest.raises(ValueError, match="hidden_dim"):
    AdapterConfig(hidden_dim=0)
  with pytest.raises(ValueError, match="tuning mode"):
    model_overrides("prompt")
  with pytest.raises(ValueError, match="tuning mode"):
    trainable_rules("prompt")


# ----------------------------------------------------------------------------------------------
# 4. SSF and the trainable rules of every tuning mode.


def test_ssf_placement_and_identity():
  model = tiny(**model_overrides("ssf"))
  params = param_shapes(model)
  scopes = {k[: -len("/ssf/scale")] for k in flat(params) if k.endswith("/ssf/scale")}
  expected = {"embedding", "Transformer/encoder_norm"}
  for i in range(TINY["depth"]):
    blk = f"Transformer/encoderblock_{i}"
    expected |= {f"{blk}/LayerNorm_0", f"{blk}/LayerNorm_2", f"{blk}/MlpBlock_3/Dense_0",
                 f"{blk}/MlpBlock_3/Dense_1"}
    expected |= {f"{blk}/MultiHeadDotProductAttention_1/{n}"
                 for n in ("query", "key", "value", "out")}
  assert scopes == expected
  p = flat(params)
  assert {k for k in p if "/ssf/" in k} == (
      {f"{s}/ssf/scale" for s in expected} | {f"{s}/ssf/shift" for s in expected})
  att = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  assert p[f"{att}/query/ssf/scale"].shape == (4, 8)
  assert p[f"{att}/out/ssf/shift"].shape == (32,)
  assert p["Transformer/encoderblock_0/MlpBlock_3/Dense_0/ssf/scale"].shape == (64,)
  # Init: scale ~ N(1, 0.02^2), shift ~ N(0, 0.02^2).
  fresh = fresh_init()
  scales = np.concatenate([np.ravel(v) for k, v in fresh.items() if k.endswith("/ssf/scale")])
  shifts = np.concatenate([np.ravel(v) for k, v in fresh.items() if k.endswith("/ssf/shift")])
  assert abs(scales.mean() - 1.0) < 0.005 and scales.std() == pytest.approx(0.02, rel=0.15)
  assert abs(shifts.mean()) < 0.005 and shifts.std() == pytest.approx(0.02, rel=0.15)

  base = tiny()
  base_params = random_model_params(base)
  identity = {k: (jnp.ones_like(v) if k.endswith("/ssf/scale") else jnp.zeros_like(v))
              for k, v in p.items() if "/ssf/" in k}
  imgs = images(3)
  got = run(model, merged(base_params, unflat(identity)), imgs)
  want = run(base, base_params, imgs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  # Random scale/shift: matches the reference with SSF after every listed module.
  rand = random_model_params(model, seed=4)
  assert_matches_reference(model, rand, imgs, np_forward(imgs, rand, TINY["depth"]))


def _names(model):
  return flat(param_shapes(model))


def test_trainable_rules_per_mode():
  ssf = _names(tiny(**model_overrides("ssf")))
  mask = trainable_mask(ssf, trainable_rules("ssf"))
  assert {k for k, v in mask.items() if v} == {k for k in ssf
                                               if "/ssf/" in k or k.startswith("head/")}

  base = _names(tiny())
  mask = trainable_mask(base, trainable_rules("bitfit"))
  on = {k for k, v in mask.items() if v}
  assert on == {k for k in base if k.endswith("/bias")} | {"head/kernel"}
  assert {"embedding/bias", "Transformer/encoder_norm/bias",
          "Transformer/encoderblock_1/LayerNorm_0/bias",
          "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/bias"} <= on
  assert "Transformer/posembed_input/pos_embedding" not in on and "cls" not in on

  mask = trainable_mask(base, trainable_rules("head_only"))
  assert {k for k, v in mask.items() if v} == {"head/kernel", "head/bias"}
  assert all(trainable_mask(base, trainable_rules("full")).values())
  mask = trainable_mask(base, trainable_rules("head_only", train_head=False))
  assert not any(mask.values())

  lora = _names(lora_model())
  mask = trainable_mask(lora, trainable_rules("lora"))
  assert {k for k, v in mask.items() if v} == {k for k in lora
                                               if "/lora/" in k or k.startswith("head/")}
  mask = trainable_mask(lora, trainable_rules("lora", train_head=False))
  assert {k for k, v in mask.items() if v} == {k for k in lora if "/lora/" in k}

  for mode in ("gist_seq_adapter", "gist_shared_par_adapter", "adaptformer"):
    names = _names(tiny(**model_overrides(mode)))
    mask = trainable_mask(names, trainable_rules(mode))
    assert {k for k, v in mask.items() if v} == {
        k for k in names if "/adapter/" in k or k.startswith("head/")}


def test_linear_probe_tuning_mode_is_a_deprecated_alias_of_head_only(caplog):
  with caplog.at_level("WARNING"):
    assert trainable_rules("linear_probe") == trainable_rules("head_only")
    assert model_overrides("linear_probe") == model_overrides("head_only") == {"peft": NO_PEFT}
  assert sum("'linear_probe' is deprecated" in r.getMessage() and "'head_only'" in r.getMessage()
             for r in caplog.records) == 2


def test_one_frozen_peft_option_passed_by_keyword():
  """Every PEFT setting travels as one immutable PeftConfig; modules take keywords only."""
  peft = model_overrides("lora", lora_rank=3, lora_targets="plain", lora_scale=0.5)["peft"]
  assert peft == PeftConfig(lora=LoraConfig(rank=3, targets=("q", "v"), scale=0.5))
  assert (peft.lora_rank("q"), peft.lora_rank("k"), peft.lora_rank(None)) == (3, 0, 0)
  assert peft.lora_scale == 0.5 and NO_PEFT.lora_scale == 1.0 and NO_PEFT.lora_rank("q") == 0
  with pytest.raises(AttributeError):
    peft.ssf = True  # frozen: a model's PEFT options cannot change after it is built
  model = tiny(peft=peft)
  names = _names(model)
  assert sorted(k.split("/")[-3] for k in names if k.endswith("/lora/a")) == \
      ["query", "query", "value", "value"]
  # The ViT's encoder fields are keyword-only settings shared with the encoder and blocks, and
  # num_classes has no positional slot that a reordered field could silently take.
  with pytest.raises(TypeError):
    type(model)(5)


def test_peft_subtree_round_trip():
  model = tiny(**model_overrides("gist_shared_par_adapter"))
  params = random_model_params(model)
  peft = flat(peft_subtree(params))
  assert set(peft) == {k for k in flat(params) if "/adapter/" in k}
  assert len(peft) == 4 * TINY["depth"]
  rest = unflat({k: v for k, v in flat(params).items() if k not in peft})
  rebuilt = merged(rest, unflat(peft))
  imgs = images(2)
  np.testing.assert_array_equal(np.asarray(run(model, rebuilt, imgs)),
                                np.asarray(run(model, params, imgs)))


# ----------------------------------------------------------------------------------------------
# 5. Drop-path.


def test_drop_path_eval_is_deterministic_and_ignores_rate():
  model = tiny(drop_path=0.5)
  plain = tiny()
  params = random_model_params(model)
  imgs = images(4)
  want = run(plain, params, imgs, features=True)
  evals = [run(model, params, imgs, features=True),
           run(model, params, imgs, features=True, rngs={"dropout": jax.random.key(9)})]
  for out in evals:
    for got, ref in zip(out["blocks"], want["blocks"]):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(want["logits"]))


def test_drop_path_per_sample_and_linear_depth_rule():
  depth, rate, batch = 3, 0.6, 256
  model = tiny(depth=depth, drop_path=rate)
  params = random_model_params(model)
  imgs = images(batch)
  rng = {"dropout": jax.random.key(42)}
  train = run(model, params, imgs, train=True, features=True, rngs=rng)
  again = run(model, params, imgs, train=True, features=True, rngs=rng)
  for a, b in zip(train["blocks"], again["blocks"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = run(model, params, imgs, train=True, features=True,
              rngs={"dropout": jax.random.key(43)})
  assert np.abs(np.asarray(other["blocks"][-1]) - np.asarray(train["blocks"][-1])).max() > 1e-3
  evals = run(model, params, imgs, features=True)
  assert np.abs(np.asarray(evals["logits"]) - np.asarray(train["logits"])).max() > 1e-3
  # Block 0 has rate 0: identical in train and eval mode.
  np.testing.assert_array_equal(np.asarray(train["blocks"][0]), np.asarray(evals["blocks"][0]))

  p = np_params(params)
  x = np.asarray(train["blocks"][0], np.float64)
  for i in range(1, depth):
    block_rate = rate * i / (depth - 1)
    keep = 1.0 - block_rate
    bp = p["Transformer"][f"encoderblock_{i}"]
    combos = [(a, m) for a in (0.0, 1.0 / keep) for m in (0.0, 1.0 / keep)]
    cands = np.stack([np_block(x, bp, keep_attn=a, keep_mlp=m) for a, m in combos])
    got = np.asarray(train["blocks"][i], np.float64)
    err = np.abs(cands - got[None]).max(axis=(2, 3))  # (combos, batch)
    best = err.argmin(0)
    # Every sample is exactly one combination: each branch dropped or scaled by 1/keep.
    assert err[best, np.arange(batch)].max() < 1e-4
    assert np.sort(err, axis=0)[1].min() > 1e-2
    dropped = sum(np.sum(np.array([c[j] == 0.0 for c in combos])[best]) for j in (0, 1))
    assert abs(dropped / (2 * batch) - block_rate) < 0.1, (i, dropped / (2 * batch))
    kept_both = np.array([a > 0 and m > 0 for a, m in combos])[best]
    assert 0 < kept_both.sum() < batch
    # The attention and MLP branches draw independent masks (timm's drop_path1/drop_path2).
    mixed = np.array([(a > 0) != (m > 0) for a, m in combos])[best]
    assert mixed.sum() > batch // 10
    x = got


def test_dropout_needs_rng_and_changes_output():
  model = tiny(dropout=0.3)
  params = random_model_params(model)
  imgs = images(2)
  a = run(model, params, imgs, train=True, rngs={"dropout": jax.random.key(1)})
  b = run(model, params, imgs, train=True, rngs={"dropout": jax.random.key(1)})
  c = run(model, params, imgs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(c), np.asarray(run(tiny(), params, imgs)))


# ----------------------------------------------------------------------------------------------
# 6. Dtype, remat, feature extraction and bad inputs.


def test_bfloat16_compute_keeps_float32_params():
  model = tiny(dtype=jnp.bfloat16, **model_overrides("gist_seq_adapter"))
  f32 = tiny(**model_overrides("gist_seq_adapter"))
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(param_shapes(model)))
  params = random_model_params(model)
  imgs = images(4)
  got = run(model, params, imgs)
  want = np.asarray(run(f32, params, imgs))
  assert got.dtype == jnp.float32
  assert np.abs(np.asarray(got) - want).max() <= 5e-2 * np.abs(want).max()
  feats = run(model, params, imgs, features=True)
  assert feats["blocks"][0].dtype == jnp.bfloat16
  assert feats["logits"].dtype == jnp.float32


def test_remat_gives_identical_logits_and_gradients():
  plain = tiny(drop_path=0.2)
  remat = tiny(drop_path=0.2, remat=True)
  params = random_model_params(plain)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      param_shapes(remat))
  imgs = images(2)
  rngs = {"dropout": jax.random.key(5)}

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, imgs, train=True, rngs=rngs) ** 2)

  np.testing.assert_array_equal(np.asarray(run(remat, params, imgs)),
                                np.asarray(run(plain, params, imgs)))
  la, ga = jax.value_and_grad(functools.partial(loss, plain))(params)
  lb, gb = jax.value_and_grad(functools.partial(loss, remat))(params)
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
  for (k, a), b in zip(flat(ga).items(), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(np.abs(np.asarray(flat(ga)["head/kernel"])).max()) > 0


def test_feature_extractor_without_head():
  model = tiny(num_classes=0)
  params = random_model_params(model)
  assert "head" not in params
  imgs = images(2)
  out = run(model, params, imgs, features=True)
  assert "logits" not in out
  assert out["pooled"].shape == (2, 32)
  assert out["tokens"].shape == (2, 17, 32)
  assert [b.shape for b in out["blocks"]] == [(2, 17, 32)] * TINY["depth"]
  ref = np_forward(imgs, params, TINY["depth"])
  np.testing.assert_allclose(np.asarray(out["pooled"]), ref["pooled"], atol=ATOL, rtol=ATOL)
  # Without features=True a head-less model returns the pooled features (timm's num_classes=0).
  plain = run(model, params, imgs)
  assert plain.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(out["pooled"]))
  # init_params / param_shapes work without a head too.
  assert set(flat(param_shapes(model))) == set(flat(params))


def test_bad_inputs_raise_clear_errors():
  model = tiny()
  params = random_model_params(model)
  with pytest.raises(ValueError, match="32px"):
    model.apply({"params": params}, images(1, size=48))
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, jnp.zeros((1, 32, 32)))
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))
  for variant in ("X/16", "B/x", "B", "B/16/2"):
    with pytest.raises(ValueError, match="unknown ViT variant"):
      build_vit(variant, 10)
  with pytest.raises(TypeError, match="unknown ViT option.*hidden_size"):
    build_vit("B/16", 10, hidden_size=3)
  with pytest.raises(ValueError, match="custom ViT needs explicit"):
    build_vit("custom", 10, width=32)
  with pytest.raises(ValueError, match="pool"):
    param_shapes(tiny(pool="max"))
  with pytest.raises(ValueError, match="divisible"):
    param_shapes(tiny(num_heads=5))
  with pytest.raises(ValueError, match="patch size"):
    param_shapes(tiny(patch_size=5))


@pytest.mark.parametrize("x_shape,a_shape,b_shape,n_in", [
    ((4, 9, 32), (32, 8), (8, 48), 1),          # fc1-like
    ((4, 9, 32), (32, 8), (8, 2, 16), 1),       # query: (heads, head_dim) outputs
    ((2, 9, 2, 16), (2, 16, 4), (4, 32), 2),    # out projection: (heads, head_dim) inputs
])
def test_low_rank_update_gradients_equal_autodiff(x_shape, a_shape, b_shape, n_in):
  # The custom backward pass only reorders the weight-gradient products (docs/performance.md).
  from jax import lax
  from idat_jax.models.layers import low_rank_update
  ks = jax.random.split(jax.random.key(0), 4)
  x, a, b = (jax.random.normal(k, s) for k, s in zip(ks, (x_shape, a_shape, b_shape)))
  target = jax.random.normal(ks[3], x_shape[:x.ndim - n_in] + b_shape[1:])

  def plain(x, a, b):
    h = lax.dot_general(x, a, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                               ((), ())))
    return lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))

  loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)) * target)
  ours = jax.jit(jax.value_and_grad(loss(lambda *t: low_rank_update(*t, n_in)),
                                    argnums=(0, 1, 2)))(x, a, b)
  ref = jax.jit(jax.value_and_grad(loss(plain), argnums=(0, 1, 2)))(x, a, b)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
  for got, want in zip(ours[1], ref[1]):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
