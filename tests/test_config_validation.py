"""Every hyperparameter is checked when the config is parsed (issue 19, item 2): a value out
of its range is a one-line ConfigError naming the key, the value and the allowed range."""

import math
import os
import subprocess
import sys

import pytest

from idat_jax import config_lib
from idat_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(config, key, value):
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


@pytest.mark.parametrize("key, value, rule", [
    ("optim.lr", -1e-3, r"\(0, inf\)"),
    ("optim.lr", 0.0, r"\(0, inf\)"),
    ("optim.lr", math.nan, r"\(0, inf\)"),
    ("optim.lr", math.inf, r"\(0, inf\)"),
    ("optim.weight_decay", -0.05, r"\[0, inf\)"),
    ("optim.min_lr", -1e-8, r"\[0, inf\)"),
    ("optim.b2", 1.0, r"\[0, 1\)"),
    ("optim.eps", 0.0, r"\(0, inf\)"),
    ("optim.momentum", 1.5, r"\[0, 1\)"),
    ("optim.warmup_epochs", 200, r"must not exceed the run's epochs \(100 \+ 10 cooldown\)"),
    ("models.student.drop_path", 1.0, r"\[0, 1\)"),
    ("models.teacher.dropout", -0.1, r"\[0, 1\)"),
    ("models.student.tuning.lora_rank", 0, r"integer >= 1"),
    ("models.student.tuning.adapter_dim", 0, r"integer >= 1"),
    ("data.few_shot_ratio", 1.5, r"\(0, 1\]"),
    ("data.stratified_split", 1.0, r"\[0, 1\)"),
    ("data.crop_scale", (0.5, 0.2), r"0 < low <= high <= 1"),
    ("idat.temperature", 0.0, r"\(0, inf\)"),
    ("idat.distill_weight", -1.0, r"\[0, inf\)"),
    ("seed", -1, r"integer in \[0, 2147483647\]"),
    ("seed", 2**31, r"integer in \[0, 2147483647\]"),
    ("data.few_shot_seed", -3, r"integer in \[0, 2147483647\]"),
])
def test_out_of_range_values_are_one_line_errors(key, value, rule):
  config = config_lib.base_config()
  config_lib.validate(config)  # the defaults are valid
  _set(config, key, value)
  with pytest.raises(ConfigError, match=rf"^config\.{key.replace('.', '[.]')}=.*: .*{rule}") as e:
    config_lib.validate(config)
  assert "\n" not in str(e.value)


def test_compute_dtype_the_backend_cannot_run_is_refused_with_the_supported_list():
  """XLA:CPU has no float16 matmul: before, a traceback from the first train step."""
  config = config_lib.base_config()
  config.models.student.dtype = "float16"
  with pytest.raises(ConfigError, match=r"^config.models.student.dtype='float16': this backend "
                     r"\(cpu\) computes in float32, bfloat16$"):
    config_lib.validate(config)
  config.models.student.dtype = "float64"
  with pytest.raises(ConfigError, match="computes in float32, bfloat16"):
    config_lib.validate(config)
  config.models.student.dtype = "bfloat16"
  config_lib.validate(config)


def test_boundaries_that_are_allowed():
  config = config_lib.base_config()
  for key, value in (("optim.weight_decay", 0.0), ("models.student.drop_path", 0.0),
                     ("data.few_shot_ratio", 1.0), ("seed", 0), ("seed", 2**31 - 1),
                     ("optim.warmup_epochs", 110), ("idat.distill_weight", 0.0)):
    _set(config, key, value)
  config_lib.validate(config)


@pytest.mark.slow
def test_negative_learning_rate_stops_before_any_work(tmp_path):
  """Before: rc 0, gradient ascent, and a results row. Now: one line, exit 1, nothing written
  but the error log."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "idat_jax.main", "--config",
       os.path.join(REPO, "configs", "idat_vtab.py") + ":task=dtd,backend=synthetic,ckpt_dir=none",
       "--workdir", str(workdir), "--config.optim.lr=-0.001"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: config.optim.lr=-0.001: must be a finite number in (0, inf)"], (
      proc.stderr[-2000:])
  assert not (workdir / "results.csv").exists() and not (workdir / "checkpoints").exists()
