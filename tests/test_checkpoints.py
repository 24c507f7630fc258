"""Checkpoint reading, strict merging, position-embedding resize and weight copy (no torch)."""

import math
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage

from idat_jax import checkpoints as ck
from idat_jax import tree_util
from idat_jax.models import AdapterConfig, LoraConfig, PeftConfig, build_vit
from vit_testing import random_params

TINY = dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32)




def tiny(num_classes=10, **kw):
  return build_vit(None, num_classes=num_classes, **dict(TINY, **kw))


def init(model, seed=100):
  """Stands in for a fresh init: random values, the model's exact tree (see random_params)."""
  return random_params(model, seed)


@pytest.fixture(scope="module")
def tiny_setup():
  model = tiny()
  params = random_params(model)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits = np.asarray(model.apply({"params": params}, images))
  return model, params, images, logits


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# --- parameter counts and the official key set ---------------------------------------------

@pytest.mark.parametrize("variant,expected", [("B/16", 86_567_656), ("S/16", 22_050_664)])
def test_param_counts_match_official(variant, expected):
  model = build_vit(variant, num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  assert count(shapes) == expected
  flat = tree_util.flatten(shapes)
  d = {"B/16": 768, "S/16": 384}[variant]
  h = d // 64
  assert flat["embedding/kernel"].shape == (16, 16, 3, d)
  assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 197, d)
  mha = "Transformer/encoderblock_11/MultiHeadDotProductAttention_1"
  assert flat[f"{mha}/query/kernel"].shape == (d, h, 64)
  assert flat[f"{mha}/out/kernel"].shape == (h, 64, d)
  assert flat["head/kernel"].shape == (d, 1000)


# --- position-embedding resize --------------------------------------------------------------

def test_posemb_resize_224_to_384_keeps_class_slot():
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  out = ck.resize_posemb(pe, (24, 24))
  assert out.shape == (1, 1 + 24 * 24, 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], pe[:, 0])
  # vit_jax / big_vision convention: scipy.ndimage.zoom(order=1) == corner-aligned bilinear.
  ref = scipy.ndimage.zoom(pe[0, 1:].reshape(14, 14, 8), (24 / 14, 24 / 14, 1), order=1)
  np.testing.assert_allclose(out[0, 1:].reshape(24, 24, 8), ref, atol=1e-6)
  # Corners are kept and a linear ramp is reproduced exactly.
  grid = out[0, 1:].reshape(24, 24, 8)
  src = pe[0, 1:].reshape(14, 14, 8)
  for (i, j), (k, m) in [((0, 0), (0, 0)), ((23, 23), (13, 13)), ((0, 23), (0, 13))]:
    np.testing.assert_allclose(grid[i, j], src[k, m], atol=1e-6)
  ramp = np.add.outer(np.arange(14.0), 2 * np.arange(14.0)).reshape(1, -1, 1)
  ramp = np.concatenate([np.full((1, 1, 1), 7.0), ramp], axis=1)
  resized = ck.resize_posemb(ramp, (27, 27))[0, 1:, 0].reshape(27, 27)
  u = np.arange(27) * 13 / 26
  np.testing.assert_allclose(resized, np.add.outer(u, 2 * u), atol=1e-9)


def test_posemb_resize_identity_and_options():
  pe = np.random.default_rng(0).normal(size=(1, 1 + 49, 4)).astype(np.float32)
  for method in ("vit_jax", "timm"):
    np.testing.assert_array_equal(ck.resize_posemb(pe, (7, 7), method=method), pe)
  # Class-token checkpoint -> GAP model (no class slot) drops it; the grid is unchanged.
  np.testing.assert_array_equal(ck.resize_posemb(pe, (7, 7), new_prefix_tokens=0), pe[:, 1:])
  # Half-pixel convention: upsampling x2 of a 2-cell grid gives 1/4-3/4 blends.
  two = np.array([0.0, 4.0]).reshape(1, 2, 1)
  out = ck.resize_posemb(two, (1, 4), old_grid=(1, 2), num_prefix_tokens=0, method="timm")
  np.testing.assert_allclose(out[0, :, 0], [0.0, 1.0, 3.0, 4.0])
  out = ck.resize_posemb(two, (1, 4), old_grid=(1, 2), num_prefix_tokens=0)
  np.testing.assert_allclose(out[0, :, 0], [0.0, 4 / 3, 8 / 3, 4.0])
  with pytest.raises(ck.CheckpointError, match="square grid"):
    ck.resize_posemb(np.zeros((1, 1 + 50, 4)), (8, 8))
  with pytest.raises(ValueError, match="method"):
    ck.resize_posemb(pe, (8, 8), method="bicubic")


def test_merge_resizes_posemb_for_new_resolution(tiny_setup, tmp_path):
  _, params, _, _ = tiny_setup
  path = tmp_path / "p.npz"
  ck.save_npz(params, path)
  big = tiny(image_size=48)  # grid 4x4 -> 6x6
  merged, report = ck.load_pretrained(init(big), path)
  key = "Transformer/posembed_input/pos_embedding"
  assert report.resized == {key: ((1, 17, 64), (1, 37, 64))}
  pe_old, pe_new = params["Transformer"]["posembed_input"]["pos_embedding"], \
      merged["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(pe_new[:, 0], pe_old[:, 0])
  np.testing.assert_allclose(pe_new[0, 1:].reshape(6, 6, 64)[[0, 0, 5, 5], [0, 5, 0, 5]],
                             pe_old[0, 1:].reshape(4, 4, 64)[[0, 0, 3, 3], [0, 3, 0, 3]],
                             atol=1e-6)
  # Everything else is loaded unchanged.
  assert ck.tree_equal(merged["Transformer"]["encoderblock_1"],
                       params["Transformer"]["encoderblock_1"])


# --- reading Google npz variants ------------------------------------------------------------

def test_in21k_file_with_pre_logits_and_opt_target_prefix(tmp_path):
  model = tiny(num_classes=21843, representation_size=64)
  params = random_params(model)
  flat = {f"opt/target/{k}": np.asarray(v) for k, v in tree_util.flatten(params).items()}
  flat["opt/state/step"] = np.array(1000)
  path = tmp_path / "ViT-Ti_in21k.npz"
  np.savez(path, **flat)

  loaded, info = ck.read_checkpoint(path)
  assert ck.tree_equal(loaded, params)
  assert "pre_logits" in loaded and loaded["pre_logits"]["kernel"].shape == (64, 64)
  assert info.format == "google_npz" and "opt/state/step" in info.ignored
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(model.apply({"params": loaded}, images),
                                model.apply({"params": params}, images))

  # Transfer: new 10-class head, no representation layer.
  target = tiny(num_classes=10)
  with pytest.raises(ck.CheckpointError) as err:
    ck.load_pretrained(init(target), path, init_only=["head/.*"])
  assert "pre_logits/kernel (64, 64)" in str(err.value) and str(path) in str(err.value)
  fresh = init(target)
  merged, report = ck.load_pretrained(fresh, path, init_only=["head/.*"],
                                      ignore_unexpected=["pre_logits/.*"])
  assert sorted(report.kept_from_init) == ["head/bias", "head/kernel"]
  assert set(report.ignored) >= {"pre_logits/kernel", "pre_logits/bias", "head/kernel",
                                 "opt/state/step"}
  assert merged["head"]["kernel"] is fresh["head"]["kernel"]
  assert ck.tree_equal(merged["Transformer"], params["Transformer"])
  assert "pre_logits" not in merged


def test_linen_and_big_vision_layouts(tiny_setup, tmp_path):
  model, params, images, logits = tiny_setup
  flat = tree_util.flatten(params)
  rename = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
            "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}

  def linen(name):
    for a, b in rename.items():
      name = name.replace(f"/{a}/", f"/{b}/")
    return name

  np.savez(tmp_path / "linen.npz", **{linen(k): v for k, v in flat.items()})
  assert ck.tree_equal(ck.load_params(tmp_path / "linen.npz"), params)

  # big_vision: 'params/' prefix, scanned blocks, top-level pos_embedding without class slot.
  # Its class token gets no position embedding, so the equivalent class slot is zero.
  bv = {}
  for k, v in flat.items():
    if k.startswith("Transformer/encoderblock_"):
      continue
    bv[f"params/{k}"] = v
  pe = bv.pop("params/Transformer/posembed_input/pos_embedding")
  bv["params/pos_embedding"] = pe[:, 1:]
  bv["params/cls"] = flat["cls"] + pe[:, :1]
  block_keys = [k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")]
  for rest in block_keys:
    bv[f"params/Transformer/encoderblock/{linen('/' + rest)[1:]}"] = np.stack(
        [flat[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
  np.savez(tmp_path / "bv.npz", **bv)
  loaded, info = ck.read_checkpoint(tmp_path / "bv.npz")
  assert any("unstacked 2" in n for n in info.notes)
  np.testing.assert_array_equal(loaded["Transformer"]["posembed_input"]["pos_embedding"][:, 0],
                                0.0)
  out = np.asarray(model.apply({"params": loaded}, images))
  np.testing.assert_allclose(out, logits, atol=1e-5)


def test_save_npz_roundtrip_and_dtypes(tmp_path):
  tree = {"a": {"kernel": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
          "b": np.float16([1.5, 2.5])}
  ck.save_npz(tree, tmp_path / "t.npz")
  with np.load(tmp_path / "t.npz") as f:
    assert sorted(f.files) == ["a/kernel", "b"]
    assert f["a/kernel"].dtype == np.float32 and f["b"].dtype == np.float16
  back = ck.load_params(tmp_path / "t.npz")
  np.testing.assert_array_equal(back["a"]["kernel"], np.arange(6.0).reshape(2, 3))
  assert sorted(os.listdir(tmp_path)) == ["t.npz"]  # the temporary file was renamed


def test_export_npz_keeps_unmergeable_peft_and_merges_lora(tmp_path):
  model = tiny(peft=PeftConfig(adapter=AdapterConfig(), lora=LoraConfig(rank=2, targets=("q",))))
  params = random_params(model, seed=5)
  remaining = ck.export_npz(params, tmp_path / "e.npz")
  assert remaining and all("/adapter/" in k for k in remaining)
  back = tree_util.flatten(ck.load_params(tmp_path / "e.npz"))
  assert not any("/lora/" in k for k in back) and set(remaining) <= set(back)
  q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query"
  flat = tree_util.flatten(params)
  expected = flat[f"{q}/kernel"] + np.einsum("dr,rhk->dhk", flat[f"{q}/lora/a"],
                                             flat[f"{q}/lora/b"])
  np.testing.assert_allclose(back[f"{q}/kernel"], expected, atol=1e-6)
  np.testing.assert_array_equal(back[f"{q}/bias"], flat[f"{q}/bias"])


def test_merge_casts_to_init_dtype(tiny_setup):
  _, params, _, _ = tiny_setup
  half = jax.tree.map(lambda x: np.asarray(x, np.float16), params)
  merged, report = ck.merge_pretrained(params, half)
  assert merged["cls"].dtype == np.float32
  assert report.cast["cls"] == ("float16", "float32")
  assert len(report.loaded) == len(tree_util.flatten(params)) and not report.kept_from_init


def test_safetensors_reader_bfloat16(tmp_path):
  # Hand-written file: safetensors' own NumPy reader cannot represent bfloat16.
  import json
  vals = np.array([[1.0, -2.5], [0.125, 3.0]], np.float32)
  data = vals.astype(ml_dtypes.bfloat16).tobytes() + np.int32([7]).tobytes()
  header = {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
            "n": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]},
            "__metadata__": {"format": "pt"}}
  h = json.dumps(header).encode()
  path = tmp_path / "x.safetensors"
  path.write_bytes(len(h).to_bytes(8, "little") + h + data)
  out = ck.read_safetensors(path)
  assert out["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["w"].astype(np.float32), vals)
  assert out["n"].tolist() == [7]


# --- strict merge and bad inputs ------------------------------------------------------------

def test_merge_report_names_every_problem(tiny_setup):
  _, params, _, _ = tiny_setup
  flat = dict(tree_util.flatten(params))
  del flat["Transformer/encoderblock_1/LayerNorm_2/scale"]
  flat["Transformer/encoderblock_0/extra_thing"] = np.zeros(3)
  flat["Transformer/encoder_norm/bias"] = np.zeros(65)
  with pytest.raises(ValueError) as err:
    ck.merge_pretrained(params, tree_util.unflatten(flat))
  msg = str(err.value)
  assert "1 missing" in msg and "Transformer/encoderblock_1/LayerNorm_2/scale (64,)" in msg
  assert "1 unexpected" in msg and "Transformer/encoderblock_0/extra_thing (3,)" in msg
  assert "1 shape mismatches" in msg
  assert "Transformer/encoder_norm/bias: checkpoint (65,) vs model (64,)" in msg
  # Named expectations make the same merge pass.
  merged, report = ck.merge_pretrained(
      params, tree_util.unflatten(flat),
      init_only=[r".*/LayerNorm_2/scale", r"Transformer/encoder_norm/.*"],
      ignore_unexpected=[r".*/extra_thing"])
  assert "Transformer/encoderblock_0/extra_thing" in report.ignored
  assert ck.tree_equal(merged, params)


def test_head_mismatch_needs_init_only(tiny_setup):
  _, params, _, _ = tiny_setup
  target = init(tiny(num_classes=3))
  with pytest.raises(ck.CheckpointError, match=r"head/kernel: checkpoint \(64, 10\) vs model "
                     r"\(64, 3\)"):
    ck.merge_pretrained(target, params)
  merged, report = ck.merge_pretrained(target, params, init_only=["head/.*"])
  assert report.ignored["head/kernel"].startswith("init_only")


def test_fresh_peft_weights_from_init(tiny_setup):
  _, params, _, _ = tiny_setup
  from idat_jax.models import PEFT_PATTERN
  model = tiny(peft=PeftConfig(lora=LoraConfig(rank=2), adapter=AdapterConfig(), ssf=True))
  fresh = init(model)
  with pytest.raises(ck.CheckpointError, match="missing from the checkpoint") as err:
    ck.merge_pretrained(fresh, params)
  for name in ("MultiHeadDotProductAttention_1/query/lora/a", "encoderblock_1/adapter/up/kernel",
               "encoder_norm/ssf/scale"):
    assert name in str(err.value)
  merged, report = ck.merge_pretrained(fresh, params, init_only=[PEFT_PATTERN])
  kinds = {k.split("/")[-2] for k in report.kept_from_init}
  assert {"lora", "ssf", "down", "up"} <= kinds
  assert all(re.fullmatch(PEFT_PATTERN, k) for k in report.kept_from_init)
  flat, fresh_flat = tree_util.flatten(merged), tree_util.flatten(fresh)
  for k in report.kept_from_init:
    assert flat[k] is fresh_flat[k]
  assert ck.tree_equal(tree_util.unflatten({k: v for k, v in flat.items()
                                    if k not in report.kept_from_init}), params)


def test_unknown_truncated_and_corrupt_files(tiny_setup, tmp_path):
  _, params, _, _ = tiny_setup
  for name in ("weights.ckpt", "weights.h5", "weights"):
    (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.raises(ck.CheckpointError, match=f"{name}: unknown checkpoint type"):
      ck.load_params(tmp_path / name)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    ck.load_params(tmp_path / "missing.npz")

  good = tmp_path / "good.npz"
  ck.save_npz(params, good)
  blob = good.read_bytes()
  for cut in (len(blob) // 2, len(blob) - 100, 30):
    bad = tmp_path / f"truncated_{cut}.npz"
    bad.write_bytes(blob[:cut])
    with pytest.raises(ck.CheckpointError, match=f"truncated_{cut}.npz: "):
      ck.load_params(bad)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(os.urandom(4096))
  with pytest.raises(ck.CheckpointError, match="garbage.npz: not a readable .npz"):
    ck.load_params(garbage)
  single = tmp_path / "single.npz"
  with open(single, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ck.CheckpointError, match="single.npz: expected an .npz archive"):
    ck.load_params(single)

  st = tmp_path / "w.safetensors"
  import json
  h = json.dumps({"cls_token": {"dtype": "F32", "shape": [1, 1, 64],
                                "data_offsets": [0, 256]}}).encode()
  st.write_bytes(len(h).to_bytes(8, "little") + h + b"\0" * 100)
  with pytest.raises(ck.CheckpointError, match=r"w.safetensors: truncated: tensor 'cls_token'"):
    ck.load_params(st)
  st.write_bytes(b"\x05")
  with pytest.raises(ck.CheckpointError, match="w.safetensors: not a safetensors file"):
    ck.load_params(st)
  st.write_bytes(os.urandom(64))
  with pytest.raises(ck.CheckpointError, match="w.safetensors"):
    ck.load_params(st)


# --- state-dict conversion without torch ---------------------------------------------------

def test_torch_names_heads_and_unknown_keys():
  rng = np.random.default_rng(0)
  d = 96
  state = {"cls_token": rng.normal(size=(1, 1, d)), "pos_embed": rng.normal(size=(1, 5, d)),
           "patch_embed.proj.weight": rng.normal(size=(d, 3, 4, 4)),
           "patch_embed.proj.bias": rng.normal(size=(d,)),
           "blocks.0.attn.qkv.weight": rng.normal(size=(3 * d, d)),
           "blocks.0.attn.qkv.bias": rng.normal(size=(3 * d,))}
  with pytest.raises(ck.CheckpointError, match="width 96 .*pass num_heads"):
    ck.convert_torch_state(state)
  out, _, _ = ck.convert_torch_state(state, num_heads=3)
  q = out["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
  v = out["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias"]
  assert q.shape == (d, 3, 32) and v.shape == (3, 32)
  # Row h*32+j of the fused q block is head h, channel j.
  np.testing.assert_array_equal(q[:, 1, 5], state["blocks.0.attn.qkv.weight"][32 + 5])
  np.testing.assert_array_equal(v[2, 7], state["blocks.0.attn.qkv.bias"][2 * d + 64 + 7])
  np.testing.assert_array_equal(out["embedding/kernel"][1, 2, 0],
                                state["patch_embed.proj.weight"][:, 0, 1, 2])
  # A 2x2 grid without class slot (timm no_embed_class) gets a zero class slot.
  state["pos_embed"] = rng.normal(size=(1, 4, d))
  out, _, notes = ck.convert_torch_state(state, num_heads=3)
  assert out["Transformer/posembed_input/pos_embedding"].shape == (1, 5, d)
  assert any("no class slot" in n for n in notes)

  deit = dict(state, dist_token=np.zeros((1, 1, d)), **{"head_dist.weight": np.zeros((5, d))})
  with pytest.raises(ck.CheckpointError, match=r"\['dist_token', 'head_dist.weight'\]"):
    ck.convert_torch_state(deit, num_heads=3)
  out, ignored, _ = ck.convert_torch_state(deit, num_heads=3, ignore=["dist_token", "head_dist.*"])
  assert set(ignored) == {"dist_token", "head_dist.weight"}
  with pytest.raises(ck.CheckpointError, match="not a ViT state dict"):
    ck.convert_torch_state({"conv1.weight": np.zeros((3, 3))})


# --- WeCoLoRA weight copy -------------------------------------------------------------------

@pytest.mark.parametrize("every,kept", [(2, [0, 2, 4, 6, 8, 10]), (3, [0, 3, 6, 9]),
                                        (1, list(range(12))), (12, [0]), (20, [0])])
def test_copy_blocks_keeps_every_rth(every, kept):
  rng = np.random.default_rng(every)
  block = lambda: {"LayerNorm_0": {"scale": rng.normal(size=4)},  # noqa: E731
                   "MlpBlock_3": {"Dense_0": {"kernel": rng.normal(size=(4, 8))}}}
  teacher = {"cls": rng.normal(size=(1, 1, 4)), "head": {"kernel": rng.normal(size=(4, 2))},
             "Transformer": {**{f"encoderblock_{i}": block() for i in range(12)},
                             "encoder_norm": {"scale": rng.normal(size=4)}}}
  student = ck.copy_blocks(teacher, every)
  assert ck.kept_blocks(12, every) == kept
  blocks = sorted(k for k in student["Transformer"] if k.startswith("encoderblock_"))
  assert blocks == sorted(f"encoderblock_{i}" for i in range(len(kept)))
  for new, old in enumerate(kept):
    assert ck.tree_equal(student["Transformer"][f"encoderblock_{new}"],
                         teacher["Transformer"][f"encoderblock_{old}"])
  assert ck.tree_equal(student["Transformer"]["encoder_norm"],
                       teacher["Transformer"]["encoder_norm"])
  assert ck.tree_equal(student["head"], teacher["head"])
  student["cls"][...] = 0  # a copy, not a view of the teacher
  assert teacher["cls"].any()


def test_copy_blocks_student_runs(tiny_setup):
  model, params, images, _ = tiny_setup
  deep = tiny(depth=6)
  teacher = random_params(deep, seed=3)
  student = ck.copy_blocks(teacher, 3)
  shallow = tiny(depth=2)
  merged, report = ck.merge_pretrained(init(shallow), student)
  assert len(report.loaded) == len(tree_util.flatten(init(shallow)))
  feats = shallow.apply({"params": merged}, images, features=True)
  assert len(feats["blocks"]) == 2 and np.isfinite(np.asarray(feats["logits"])).all()


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2", None])
def test_copy_blocks_rejects_bad_every(every):
  tree = {"Transformer": {"encoderblock_0": {"w": np.zeros(1)}}}
  with pytest.raises(ValueError, match="every must be an integer >= 1"):
    ck.copy_blocks(tree, every)


def test_copy_blocks_rejects_treeless_and_gaps():
  with pytest.raises(ck.CheckpointError, match="without blocks"):
    ck.copy_blocks({"Transformer": {"encoder_norm": {"scale": np.ones(2)}}}, 2)
  with pytest.raises(ck.CheckpointError, match="no 'Transformer'"):
    ck.copy_blocks({"head": {}}, 2)
  with pytest.raises(ck.CheckpointError, match=r"\[0, 2\]"):
    ck.copy_blocks({"Transformer": {"encoderblock_0": {}, "encoderblock_2": {}}}, 2)


@pytest.mark.parametrize("mode,head_classes", [("gist_seq_adapter", 7), ("lora", 10)])
def test_load_models_inits_only_what_the_checkpoint_lacks(tmp_path, mode, head_classes):
  # The trainer compiles random initialisers only for the parameters the checkpoint does not
  # provide (adapters / LoRA, a head for a new class count). Those must equal what a full
  # ``init`` gives, and everything else must be the checkpoint's values.
  from idat_jax import config_lib, sharding, train
  from idat_jax.methods import build_method
  from idat_jax.models import dummy_images

  backbone = build_vit(variant="custom", width=32, depth=2, num_heads=2, mlp_dim=64,
                       patch_size=8, image_size=16, num_classes=10)
  path = str(tmp_path / "backbone.npz")
  ck.save_npz(random_params(backbone, seed=3), path)
  c = config_lib.base_config()
  c.method = "supervised"
  c.data.image_size = 16
  c.data.num_classes = head_classes
  c.models.student = config_lib.model_config("custom", path, mode)
  c.models.student.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8))
  method = build_method(c)
  rng = jax.random.key(5)
  params, _, _, _ = train.load_models(method, rng, sharding.make_mesh(1))

  spec = method.specs["student"]
  full = jax.jit(spec.module.init)(jax.random.fold_in(rng, 0),
                                   dummy_images(spec.module))["params"]
  reference, report = ck.merge_pretrained(
      jax.device_get(full), ck.load_params(path, num_heads=spec.num_heads),
      init_only=spec.init_only, ignore_unexpected=spec.ignore_unexpected)
  got, want = tree_util.flatten(jax.device_get(params["student"])), tree_util.flatten(reference)
  assert sorted(got) == sorted(want)
  fresh = set(report.kept_from_init)
  assert any(n.startswith("head/") for n in fresh)  # the recipes always train a fresh head
  assert any(("adapter" in n or "lora" in n) for n in fresh)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert all(np.any(got[n] != 0) for n in fresh if not n.endswith(("bias", "lora/b")))
