"""The speed-measurement path: synthetic task data, the trainer's per-epoch timing, the
persistent compilation cache, the benchmark's protocol arithmetic, and the PyTorch baseline
step that the benchmark compares against (the reference's two-scaler, two-backward order)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from idat_jax import data
from idat_jax.data import vtab
from repo_files import REPO, load_file


def _benchmark_module():
  return load_file("scripts/benchmark.py")


# ---------------------------------------------------------------------------------------------
# Synthetic task data.


def test_synthetic_source_has_the_task_sizes_and_is_deterministic():
  test = data.open_task_split("kitti", "test", backend="synthetic", image_size=16)
  train = data.open_task_split("sun397", "train800val200", backend="synthetic", image_size=16)
  assert (len(test), test.num_classes) == (vtab.get_task("kitti").test_size, 4) == (711, 4)
  assert (len(train), train.num_classes) == (1000, 397)
  image, label = test.get(5)
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and label == 5 % 4
  again = data.open_task_split("kitti", "test", backend="synthetic", image_size=16)
  np.testing.assert_array_equal(again.get(5)[0], image)
  assert not np.array_equal(test.get(6)[0], image)  # examples differ
  assert not np.array_equal(
      data.open_task_split("kitti", "val200", backend="synthetic", image_size=16).get(5)[0],
      image)  # so do splits
  labels = train.labels()
  np.testing.assert_array_equal(labels, [train.get(i)[1] for i in range(len(train))])
  assert np.bincount(labels, minlength=397).min() >= 2  # every class present


def test_synthetic_source_goes_through_the_cache_like_real_data(tmp_path):
  source = data.open_task_split("dtd", "val200", backend="synthetic", image_size=8)
  first = data.load_arrays(source, 8, cache_dir=str(tmp_path))
  entry = data.cache_entry_dir(str(tmp_path), source, 8)
  assert entry is not None and os.path.isfile(os.path.join(entry, "images.npy"))
  cached = data.load_arrays(source, 8, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(first[0], cached[0])
  np.testing.assert_array_equal(first[1], cached[1])
  np.testing.assert_array_equal(first[0][3], source.get(3)[0])


def test_synthetic_source_rejects_bad_inputs():
  with pytest.raises(data.UnknownTaskError, match="nope"):
    data.open_task_split("nope", "test", backend="synthetic")
  with pytest.raises(data.DataError, match="unknown VTAB split"):
    data.open_task_split("dtd", "train", backend="synthetic")
  with pytest.raises(data.DataError, match="positive size"):
    data.SyntheticTaskSource("dtd", "test", image_size=0)
  with pytest.raises(IndexError, match="outside"):
    data.SyntheticTaskSource("dtd", "val200", image_size=4).get(200)


# ---------------------------------------------------------------------------------------------
# The real entry point on synthetic data: epoch timing and the compilation cache.


TINY = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}


@pytest.mark.slow
def test_cli_on_synthetic_data_times_epochs_and_fills_the_compilation_cache(tmp_path):
  sweep = tmp_path / "sweep"
  args = ["--config", os.path.join(REPO, "configs", "idat_vtab.py")
          + ":task=kitti,backend=synthetic,ckpt_dir=none,dtype=float32",
          "--workdir", str(sweep / "kitti"), "--config.data.image_size=16",
          "--config.optim.epochs=2", "--config.optim.cooldown_epochs=0",
          "--config.optim.warmup_epochs=0", "--config.batch_size=200",
          "--config.eval_batch_size=128", "--config.progress_bar=False", "--json"]
  for model in ("student", "teacher"):
    args.append(f"--config.models.{model}.variant=custom")
    args += [f"--config.models.{model}.{k}={v}" for k, v in TINY.items()]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "idat_jax.main", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  # Every one of kitti's 711 test images was evaluated (a count, not a padded batch).
  correct = summary["last_top1"] * 711 / 100
  assert abs(correct - round(correct)) < 1e-6
  times = summary["epoch_times"]
  assert [t[0] for t in times] == [1, 2]
  assert all(t[1] > 0 and t[2] > 0 and t[3] >= 0 for t in times)  # train, eval, checkpoint
  assert summary["setup_s"] + sum(sum(t[1:]) for t in times) <= summary["wall_time_s"] + 1e-2
  # The default cache sits next to the work dir, shared by the sweep's runs.
  cache = sweep / "jax_cache"
  assert cache.is_dir() and any(cache.iterdir()), "no compiled program was persisted"


# ---------------------------------------------------------------------------------------------
# Benchmark arithmetic and configs.


def test_protocol_evaluation_count():
  bench = _benchmark_module()
  assert bench.evaluations(110, 1) == 110
  assert bench.evaluations(110, 10) == 11   # epochs 10, 20, ..., 110
  assert bench.evaluations(105, 10) == 11   # ... 100 and the last (105)
  assert bench.evaluations(3, 10) == 1


def test_benchmark_runs_the_users_recipes():
  bench = _benchmark_module()
  p = bench.PRESETS["h100"]
  c = bench.idat_config(p, 256, "auto", task="dtd", epochs=2, eval_every=10)
  assert (c.models.student.variant, c.models.teacher.variant) == ("B/16", "S/16")
  assert c.models.student.checkpoint == c.models.teacher.checkpoint == ""
  assert c.models.student.dtype == "bfloat16" and c.models.student.drop_path == 0.0
  assert (c.data.backend, c.data.task, c.batch_size, c.eval_every_epochs) == (
      "synthetic", "dtd", 256, 10)
  assert c.optim.lr == 5e-3  # dtd's recipe learning rate
  w = bench.weco_config(p, "auto")
  assert w.models.student.tuning.lora_rank == 128 and w.wecolora.reduction == 2
  assert w.optim.accum_steps == 1 and w.batch_size == 128


def test_idat_recipe_dtype_and_random_init_arguments():
  module = load_file("configs/idat_vtab.py")
  c = module.get_config("task=dtd")
  assert c.models.student.dtype == c.models.teacher.dtype == "bfloat16"
  assert c.models.student.checkpoint.startswith("pretrained/B_16-i21k")
  c = module.get_config("task=dtd,dtype=float32,ckpt_dir=none")
  assert c.models.student.dtype == "float32" and c.models.teacher.checkpoint == ""
  with pytest.raises(ValueError, match="dtype must be"):
    module.get_config("dtype=float16")


# ---------------------------------------------------------------------------------------------
# The PyTorch baseline the benchmark times.


@pytest.mark.slow
@pytest.mark.parametrize("amp", [False, True])
def test_torch_baseline_idat_step_trains_both_models_only_in_their_adapters_and_heads(amp):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  import torch_reference as tb
  torch.manual_seed(0)
  small = dict(depth=2, num_heads=2, patch_size=8, image_size=16, num_classes=5)
  student = tb.add_gist_adapters(tb.timm_vit(width=32, mlp_dim=64, **small))
  teacher = tb.add_gist_adapters(tb.timm_vit(width=16, mlp_dim=32, **small))
  before = {f"{m}.{k}": v.detach().clone() for m, model in (("s", student), ("t", teacher))
            for k, v in model.state_dict().items()}
  # amp=True on CPU runs the reference's order (backward, student step, backward, teacher step)
  # under bf16 autocast: what the benchmark does with fp16 on CUDA.
  step = tb.idat_step_fn(student, teacher, amp, device="cpu")
  x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
  losses = [float(step(x, y).detach()) for _ in range(8)]
  assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.05, losses
  for m, model in (("s", student), ("t", teacher)):
    for k, v in model.state_dict().items():
      moved = not torch.equal(v, before[f"{m}.{k}"])
      assert moved == ("gist" in k or k.startswith("head.")), (m, k)


def test_compilation_cache_location():
  from idat_jax import config_lib, train
  c = config_lib.base_config()
  assert train.compilation_cache_path(c, "/runs/sweep/dtd") == "/runs/sweep/jax_cache"
  assert train.compilation_cache_path(c, "/runs/sweep/dtd", current="/env/cache") == "/env/cache"
  # Shared by a pod's hosts: JAX writes entries from process 0 only, every host reads them.
  assert train.compilation_cache_path(c, "gs://bucket/runs/dtd") == "gs://bucket/runs/jax_cache"
  c.compilation_cache_dir = "/explicit"
  assert train.compilation_cache_path(c, "/runs/x", current="/env/cache") == "/explicit"
  c.compilation_cache_dir = "none"
  assert train.compilation_cache_path(c, "/runs/x", current="/env/cache") is None
