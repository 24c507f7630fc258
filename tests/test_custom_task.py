"""A user's own folder task through ``configs/idat_vtab.py:task=NAME`` (issue 11, item 5).

* registered VTAB-1K tasks keep their released (lr, wd, drop-path);
* an unregistered task needs lr and wd, or the documented ``custom`` recipe: never the
  default task's values in silence;
* ``describe_recipe`` says which recipe is in force, where it came from, and what was
  overridden (including a task changed after the config chose its recipe);
* the class count of a folder task without ``task.json`` comes from its list files.
"""

import os

import jax
import numpy as np
import pytest

from idat_jax import train
from idat_jax.data import vtab, write_digits_task
from idat_jax.tree_util import flatten
from repo_files import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)


def _idat_vtab():
  return load_file("configs/idat_vtab.py", "idat_vtab_cfg_custom")


def test_registered_tasks_keep_the_released_recipe():
  cfg = _idat_vtab()
  c = cfg.get_config("task=eurosat")
  assert (c.optim.lr, c.optim.weight_decay, c.models.student.drop_path,
          c.models.teacher.drop_path) == (3e-3, 5e-2, 0.2, 0.2)
  assert c.optim.recipe == "idat_vtab:eurosat@eurosat" and c.data.num_classes is None
  c = cfg.get_config("task=cifar100")  # alias -> folder name
  assert c.data.task == "cifar" and c.optim.recipe == "idat_vtab:cifar@cifar" and c.optim.lr == 5e-3
  assert cfg.TASK_HPARAMS["clevr_dist"] == (5e-2, 5e-2, 0.1)
  assert len(vtab.IDAT_RECIPES) == 19 and set(vtab.IDAT_RECIPES) == set(vtab.VTAB_TASKS)


def test_unregistered_task_requires_lr_and_wd_or_custom():
  cfg = _idat_vtab()
  with pytest.raises(ValueError, match=r"task 'my_flowers' has no registered recipe.*"
                                       r"lr=5e-3,wd=5e-5.*recipe=custom"):
    cfg.get_config("task=my_flowers")
  with pytest.raises(ValueError, match="no registered recipe"):
    cfg.get_config("task=my_flowers,lr=1e-2")  # wd missing
  c = cfg.get_config("task=my_flowers,recipe=custom")
  assert c.data.task == "my_flowers" and c.optim.recipe == "idat_vtab:custom@my_flowers"
  assert (c.optim.lr, c.optim.weight_decay, c.models.student.drop_path) == (5e-3, 5e-5, 0.0)
  assert c.data.num_classes is None  # read from the data at setup
  c = cfg.get_config("task=my_flowers,lr=1e-2,wd=1e-4,drop_path=0.1")
  assert c.optim.recipe == "idat_vtab:explicit@my_flowers"
  assert (c.optim.lr, c.optim.weight_decay, c.models.teacher.drop_path) == (1e-2, 1e-4, 0.1)
  c = cfg.get_config("task=my_flowers,recipe=flowers102")  # borrow a registered recipe
  assert c.optim.recipe == "idat_vtab:oxford_flowers102@my_flowers" and c.optim.lr == 5e-3
  with pytest.raises(ValueError, match="unknown recipe 'nope'"):
    cfg.get_config("task=my_flowers,recipe=nope")
  with pytest.raises(ValueError, match="no '/'"):
    cfg.get_config("task=a/b,recipe=custom")


def test_describe_recipe_names_origin_and_overrides():
  cfg = _idat_vtab()
  text = vtab.describe_recipe(cfg.get_config("task=dtd"))
  assert text.splitlines()[0] == ("recipe: idat_vtab recipe of VTAB-1K task 'dtd' "
                                  f"({vtab.IDAT_SOURCE}) for task 'dtd'")
  assert ("in force: lr 0.005, weight decay 5e-05, drop-path 0 (student), drop-path 0 "
          "(teacher); adamw (no-decay rule torch), timm_cosine_epoch, 100 epochs + 10 "
          "cooldown, warmup 10, batch 64") in text
  assert "overridden" not in text and "WARNING" not in text

  c = cfg.get_config("task=dtd,lr=1e-2")
  c.models.student.drop_path = 0.3   # as --config.models.student.drop_path=0.3 would
  text = vtab.describe_recipe(c)
  assert "overridden: lr 0.01 (recipe: 0.005)" in text
  assert "overridden: drop-path of the student 0.3 (recipe: 0)" in text
  assert "teacher 0" not in text.split("in force")[1].split("overridden")[1]

  c = cfg.get_config("task=my_flowers,recipe=custom")
  assert vtab.describe_recipe(c).startswith(
      "recipe: the documented 'custom' recipe (idat_vtab; lr 0.005, weight decay 5e-05, "
      "drop-path 0) for task 'my_flowers'")
  c = cfg.get_config("task=my_flowers,lr=1e-2,wd=1e-4")
  assert vtab.describe_recipe(c).startswith(
      "recipe: lr and weight decay given explicitly (idat_vtab arguments) for task 'my_flowers'")

  # A borrowed recipe is said so, without a warning.
  text = vtab.describe_recipe(cfg.get_config("task=my_flowers,recipe=flowers102"))
  assert "recipe of VTAB-1K task 'oxford_flowers102'" in text and "for task 'my_flowers'" in text
  assert "note: borrowed with idat_vtab:recipe=oxford_flowers102" in text
  assert "WARNING" not in text

  # The silent case: dtd's recipe applied to another task via --config.data.task.
  c = cfg.get_config("task=dtd")
  c.data.task = "my_flowers"
  assert ("WARNING: the recipe was chosen for task 'dtd' but the run's task is 'my_flowers'"
          in vtab.describe_recipe(c))
  c = cfg.get_config("task=other,recipe=custom")
  c.data.task = "my_flowers"
  assert "WARNING: the recipe was chosen for task 'other'" in vtab.describe_recipe(c)

  # Other config files may name their recipe; none set: the config file's own values.
  c = cfg.get_config("task=dtd")
  c.optim.recipe = "wecolora_distill:README command@imagenet2012"
  assert vtab.describe_recipe(c).startswith(
      "recipe: README command (configs/wecolora_distill.py) for task 'dtd'")

  from idat_jax import demo
  text = vtab.describe_recipe(demo.demo_config("idat", "/data"))
  assert text.startswith("recipe: the values set in the config file (method idat, task "
                         "'digits_5to9')")


@pytest.fixture(scope="module")
def user_task_root(tmp_path_factory):
  """A folder task the registry does not know, without task.json (classes from the labels)."""
  root = str(tmp_path_factory.mktemp("user_data"))
  write_digits_task(root, name="my_digits", classes=(5, 6, 7, 8, 9), train_size=500, seed=0)
  os.remove(os.path.join(root, "my_digits", "task.json"))
  return root


def test_custom_folder_task_sets_up_with_classes_from_the_data(user_task_root, tmp_path):
  c = _idat_vtab().get_config("task=my_digits,recipe=custom,ckpt_dir=none,dtype=float32")
  c.data.root = user_task_root
  c.data.image_size = 16
  for m in (c.models.student, c.models.teacher):
    m.variant = "custom"
    for key, value in TINY.items():
      m[key] = value
  c.batch_size, c.eval_batch_size, c.num_devices = 40, 100, 1
  c.progress_bar = False
  s = train.setup(c, str(tmp_path / "run"))
  assert s.method.num_classes == 5  # largest label in the list files + 1
  assert c.data.num_classes is None  # a data fact of the method, not written to the config
  assert s.steps_per_epoch == 500 // 40
  heads = {k: v.shape for k, v in flatten(jax.device_get(s.state["trainable"])).items()
           if k.endswith("head/kernel")}
  assert heads == {"student/head/kernel": (32, 5), "teacher/head/kernel": (32, 5)}
  # The custom lr drives timm's cosine (absolute epoch, no warmup prefix): epoch 10 of 100.
  lr, min_lr = vtab.CUSTOM_RECIPE.lr, c.optim.min_lr
  expected = min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * 10 / 100))
  assert np.isclose(float(s.schedule(10 * s.steps_per_epoch)), expected, rtol=1e-5)


def test_probe_config_reads_the_vtab_folder_layout(user_task_root):
  """configs/wecolora_linprobe.py on a folder task: the iDAT protocol's splits, no overrides."""
  from idat_jax.data import inputs
  module = load_file("configs/wecolora_linprobe.py")
  c = module.get_config(f"dataset=my_digits,backend=folder,root={user_task_root}")
  assert (c.data.train_split, c.data.eval_split) == ("train800val200", "test")
  train_source = inputs.build_source(c, c.data.train_split)
  eval_source = inputs.build_source(c, c.data.eval_split)
  assert len(train_source) > 0 and len(eval_source) > 0
  assert train_source.num_classes == eval_source.num_classes == 5
