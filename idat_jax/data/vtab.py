"""The VTAB-1K task registry: TFDS sources, split slices and label transforms.

The definitions follow google-research/task_adaptation (the source of VTAB): each task names
a TFDS data set and version, the ``train800`` / ``val200`` / ``train800val200`` / ``test``
slices, and a label transform. Tasks are keyed by the folder names of the NOAH/SSF/iDAT
VTAB-1K layout (``cifar``, ``oxford_iiit_pet``, ...); the ``--dataset`` names of the SSF/iDAT
scripts (``cifar100``, ``pets``, ``flowers102``) are aliases.

Label and image transforms are plain numpy functions over one decoded TFDS example (the dict
that ``tfds.data_source`` returns), so they run without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from idat_jax.data.base import DataError, UnknownTaskError

NATURAL = "Natural"
SPECIALIZED = "Specialized"
STRUCTURED = "Structured"
EMBEDDED = "Embedded"  # not part of VTAB: data shipped inside a package (see digits.py)
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)

# The four VTAB-1K splits; ``train800val200`` trains, ``test`` evaluates (iDAT/SSF protocol).
SPLITS = ("train800", "val200", "train800val200", "test")
DEFAULT_TRAIN_SPLIT = "train800val200"
DEFAULT_EVAL_SPLIT = "test"
TRAIN_SPLIT_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}

# Bin edges of task_adaptation's clevr.py and kitti.py.
CLEVR_DISTANCE_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
KITTI_DISTANCE_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])
KITTI_NO_VEHICLE_DEPTH = 1000.0  # appended before the min, so "no vehicle" is the last bin
KITTI_VEHICLE_TYPES = 3  # objects/type < 3: Car, Van, Truck

Example = Mapping[str, Any]
LabelFn = Callable[[Example], int]
ImageFn = Callable[[Example], np.ndarray]


def threshold_bin(value: float, thresholds: np.ndarray) -> int:
  """Largest ``i`` with ``thresholds[i] < value`` (task_adaptation's clevr/kitti bin rule)."""
  below = np.nonzero(np.asarray(thresholds) < value)[0]
  if below.size == 0:
    raise ValueError(f"value {value} is not above any threshold of {list(thresholds)}")
  return int(below.max())


def clevr_count_label(example: Example) -> int:
  """Number of objects minus 3 (CLEVR scenes hold 3 to 10 objects, giving classes 0..7)."""
  return int(np.size(example["objects"]["size"])) - 3


def clevr_distance_label(example: Example) -> int:
  """Bin of the closest object's depth (``pixel_coords[:, 2]``)."""
  depth = np.asarray(example["objects"]["pixel_coords"], np.float64).reshape(-1, 3)[:, 2]
  if depth.size == 0:
    raise ValueError("a CLEVR scene without objects has no distance label")
  return threshold_bin(float(depth.min()), CLEVR_DISTANCE_THRESHOLDS)


def kitti_distance_label(example: Example) -> int:
  """Bin of the closest vehicle's depth: <8 m, 8-20 m, >20 m, or no vehicle (depth 1000)."""
  objects = example["objects"]
  types = np.asarray(objects["type"]).reshape(-1)
  depth = np.asarray(objects["location"], np.float64).reshape(-1, 3)[:, 2]
  vehicle_depth = np.concatenate([depth[types < KITTI_VEHICLE_TYPES], [KITTI_NO_VEHICLE_DEPTH]])
  return threshold_bin(float(vehicle_depth.min()), KITTI_DISTANCE_THRESHOLDS)


def binned_label(key: str, num_original: int, num_classes: int) -> LabelFn:
  """floor(label / (num_original / num_classes)), as task_adaptation's dSprites tasks."""
  factor = float(num_original) / num_classes

  def fn(example: Example) -> int:
    return int(np.floor(float(np.asarray(example[key])) / factor))

  fn.__name__ = f"binned_{key}_{num_original}_to_{num_classes}"
  return fn


def key_label(key: str = "label") -> LabelFn:
  def fn(example: Example) -> int:
    return int(np.asarray(example[key]))

  fn.__name__ = f"label_from_{key}"
  return fn


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1) or (H, W, 3) uint8 -> (H, W, 3) uint8, grey tiled to three channels."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[:, :, :3]
  return np.ascontiguousarray(image, dtype=np.uint8)


def rgb_image(example: Example) -> np.ndarray:
  return to_rgb(example["image"])


def dsprites_image(example: Example) -> np.ndarray:
  """dSprites pixels are {0, 1}: scale by 255, tile to RGB."""
  image = np.asarray(example["image"]).astype(np.int32) * 255
  return to_rgb(np.clip(image, 0, 255).astype(np.uint8))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One VTAB-1K task (or an embedded non-VTAB task when ``tfds_name`` is None)."""
  name: str  # folder name of the NOAH/SSF layout
  group: str
  num_classes: int
  test_size: int
  tfds_name: str | None = None  # e.g. "eurosat/rgb"
  tfds_version: str | None = None  # task_adaptation's version (glob) first
  tfds_fallback_versions: tuple[str, ...] = ()  # tried when the first cannot be loaded
  tfds_splits: tuple[tuple[str, str], ...] = ()  # (VTAB split, TFDS split string)
  label_fn: LabelFn = key_label()
  image_fn: ImageFn = rgb_image
  manual_download: str | None = None
  description: str = ""

  @property
  def has_tfds(self) -> bool:
    return self.tfds_name is not None

  @property
  def tfds_versions(self) -> tuple[str, ...]:
    return ((self.tfds_version,) if self.tfds_version else ()) + self.tfds_fallback_versions

  def tfds_split(self, split: str) -> str:
    """TFDS split string of a VTAB split name."""
    check_split(split)
    splits = dict(self.tfds_splits)
    if split not in splits:
      raise DataError(f"task {self.name!r} has no TFDS source (folder backend only)")
    return splits[split]

  def split_size(self, split: str) -> int:
    check_split(split)
    return TRAIN_SPLIT_SIZES.get(split, self.test_size)


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise DataError(f"unknown VTAB split {split!r}; valid splits: {', '.join(SPLITS)}")
  return split


def _tfds_splits(train: str, val200: str, test: str) -> tuple[tuple[str, str], ...]:
  """train800 = train[:800]; train800val200 = train800 + val200 (task_adaptation)."""
  train800 = f"{train}[:800]"
  return (("train800", train800), ("val200", val200),
          ("train800val200", f"{train800}+{val200}"), ("test", test))


_DR_MANUAL = (
    "diabetic_retinopathy_detection needs a manual download from Kaggle "
    "(https://www.kaggle.com/c/diabetic-retinopathy-detection/data, tens of GB; accept the "
    "competition rules first). Unpack into <data_dir>/downloads/manual/ so that it holds "
    "train/ (all train.zip.00* parts), test/ (all test.zip.00* parts), sample/ (sample.zip), "
    "trainLabels.csv and sampleSubmission.csv. The btgraham-300 config also needs "
    "opencv-python, and TFDS downloads the test labels (retinopathy_solution.csv) itself.")
_RESISC_MANUAL = (
    "resisc45 needs a manual download: NWPU-RESISC45.rar (~427 MB, linked from the TFDS "
    "catalog page of resisc45, OneDrive). Extract it into <data_dir>/downloads/manual/ so that "
    "<data_dir>/downloads/manual/NWPU-RESISC45/<class>/<image>.jpg exists.")


def _task(name, group, num_classes, test_size, tfds_name, version, train, val200, test, *,
          label_fn: LabelFn | None = None, image_fn: ImageFn = rgb_image,
          fallback: tuple[str, ...] = (), manual: str | None = None,
          description: str = "") -> TaskSpec:
  return TaskSpec(
      name=name, group=group, num_classes=num_classes, test_size=test_size,
      tfds_name=tfds_name, tfds_version=version, tfds_fallback_versions=fallback,
      tfds_splits=_tfds_splits(train, val200, test),
      label_fn=label_fn or key_label(), image_fn=image_fn, manual_download=manual,
      description=description)


_TASK_LIST = (
    # Natural.
    _task("caltech101", NATURAL, 102, 6084, "caltech101", "3.*.*",
          "train", "train[2754:2954]", "test"),
    _task("cifar", NATURAL, 100, 10000, "cifar100", "3.*.*",
          "train", "train[45000:45200]", "test"),
    _task("dtd", NATURAL, 47, 1880, "dtd", "3.*.*", "train", "validation[:200]", "test"),
    _task("oxford_flowers102", NATURAL, 102, 6149, "oxford_flowers102", "2.*.*",
          "train", "validation[:200]", "test"),
    # task_adaptation pins 3.*.*; TFDS >= 4.9 only builds 4.0.0 (same images and split sizes).
    _task("oxford_iiit_pet", NATURAL, 37, 3669, "oxford_iiit_pet", "3.*.*",
          "train", "train[2944:3144]", "test", fallback=("4.*.*",)),
    _task("svhn", NATURAL, 10, 26032, "svhn_cropped", "3.*.*",
          "train", "train[65931:66131]", "test"),
    _task("sun397", NATURAL, 397, 21750, "sun397/tfds", "4.*.*",
          "train", "validation[:200]", "test"),
    # Specialized.
    _task("patch_camelyon", SPECIALIZED, 2, 32768, "patch_camelyon", "2.*.*",
          "train", "validation[:200]", "test"),
    _task("eurosat", SPECIALIZED, 10, 5400, "eurosat/rgb", "2.*.*",
          "train", "train[16200:16400]", "train[21600:]"),
    _task("resisc45", SPECIALIZED, 45, 6300, "resisc45", "3.*.*",
          "train", "train[18900:19100]", "train[25200:]", manual=_RESISC_MANUAL),
    _task("diabetic_retinopathy", SPECIALIZED, 5, 42670,
          "diabetic_retinopathy_detection/btgraham-300", "3.*.*",
          "train", "validation[:200]", "test", manual=_DR_MANUAL),
    # Structured. CLEVR is tested on TFDS `validation` (the CLEVR test labels are not public).
    _task("clevr_count", STRUCTURED, 8, 15000, "clevr", "3.*.*",
          "train", "train[63000:63200]", "validation", label_fn=clevr_count_label),
    _task("clevr_dist", STRUCTURED, 6, 15000, "clevr", "3.*.*",
          "train", "train[63000:63200]", "validation", label_fn=clevr_distance_label),
    _task("dmlab", STRUCTURED, 6, 22735, "dmlab", "2.0.1", "train", "validation[:200]", "test"),
    # task_adaptation pins 3.1.0; 3.2.0 yields identical data (task_adaptation#18).
    _task("kitti", STRUCTURED, 4, 711, "kitti", "3.1.0", "train", "validation[:200]", "test",
          label_fn=kitti_distance_label, fallback=("3.2.0",)),
    _task("dsprites_loc", STRUCTURED, 16, 73728, "dsprites", "2.*.*",
          "train", "train[589824:590024]", "train[663552:]",
          label_fn=binned_label("label_x_position", 32, 16), image_fn=dsprites_image),
    _task("dsprites_ori", STRUCTURED, 16, 73728, "dsprites", "2.*.*",
          "train", "train[589824:590024]", "train[663552:]",
          label_fn=binned_label("label_orientation", 40, 16), image_fn=dsprites_image),
    _task("smallnorb_azi", STRUCTURED, 18, 12150, "smallnorb", "2.*.*",
          "train", "test[:200]", "test[50%:]", label_fn=key_label("label_azimuth")),
    _task("smallnorb_ele", STRUCTURED, 9, 12150, "smallnorb", "2.*.*",
          "train", "test[:200]", "test[50%:]", label_fn=key_label("label_elevation")),
)

VTAB_TASKS: tuple[str, ...] = tuple(t.name for t in _TASK_LIST)

# Not VTAB: scikit-learn's handwritten digits written out as a folder task (digits.py).
DIGITS = TaskSpec(
    name="digits", group=EMBEDDED, num_classes=10, test_size=797,
    description="scikit-learn load_digits() as a VTAB-style folder task (folder backend only)")

TASKS: Mapping[str, TaskSpec] = {t.name: t for t in _TASK_LIST + (DIGITS,)}

ALIASES: Mapping[str, str] = {
    "cifar100": "cifar",  # SSF/iDAT --dataset names
    "flowers102": "oxford_flowers102",
    "pets": "oxford_iiit_pet",
    "oxford_pet": "oxford_iiit_pet",  # NOAH --data-set name
}


def canonical_name(name: str) -> str:
  """Folder name of a task or alias; raises with the list of valid names if unknown."""
  key = name.strip().lower()
  key = ALIASES.get(key, key)
  if key not in TASKS:
    valid = ", ".join(sorted(TASKS))
    aliases = ", ".join(f"{a}->{t}" for a, t in sorted(ALIASES.items()))
    raise UnknownTaskError(f"unknown task {name!r}. Valid tasks: {valid}. Aliases: {aliases}.")
  return key


def get_task(name: str) -> TaskSpec:
  """The registry entry of a task folder name or alias."""
  return TASKS[canonical_name(name)]


def is_registered(name: str) -> bool:
  key = name.strip().lower()
  return ALIASES.get(key, key) in TASKS


def tasks_in_group(group: str) -> tuple[str, ...]:
  if group not in GROUPS + (EMBEDDED,):
    raise ValueError(f"unknown group {group!r}; valid: {', '.join(GROUPS + (EMBEDDED,))}")
  return tuple(t.name for t in TASKS.values() if t.group == group)


# ---------------------------------------------------------------------------------------------
# Training recipes: where a run's lr, weight decay and drop-path come from.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Per-task hyper-parameters of a tuning recipe (iDAT/SSF VTAB-1K: lr, wd, drop-path)."""
  lr: float
  weight_decay: float
  drop_path: float


IDAT_SOURCE = "JCruan519/iDAT train_vtab_onlinekd.sh, identical to SSF's"

# Per-task (lr, weight decay, drop-path) of the released iDAT script.
IDAT_RECIPES: Mapping[str, Recipe] = {name: Recipe(*values) for name, values in {
    "caltech101": (1e-3, 5e-2, 0.1),
    "cifar": (5e-3, 5e-5, 0.0),
    "clevr_count": (2e-3, 5e-2, 0.1),
    "clevr_dist": (5e-2, 5e-2, 0.1),
    "diabetic_retinopathy": (5e-3, 5e-5, 0.2),
    "dmlab": (5e-3, 5e-5, 0.1),
    "dsprites_loc": (1e-2, 5e-5, 0.0),
    "dsprites_ori": (5e-3, 5e-5, 0.2),
    "dtd": (5e-3, 5e-5, 0.0),
    "eurosat": (3e-3, 5e-2, 0.2),
    "oxford_flowers102": (5e-3, 5e-5, 0.0),
    "kitti": (1e-2, 5e-5, 0.0),
    "patch_camelyon": (5e-3, 5e-5, 0.0),
    "oxford_iiit_pet": (5e-3, 5e-5, 0.0),
    "resisc45": (2e-3, 5e-5, 0.1),
    "smallnorb_azi": (2e-2, 5e-5, 0.1),
    "smallnorb_ele": (5e-3, 5e-2, 0.2),
    "sun397": (5e-3, 5e-5, 0.0),
    "svhn": (1e-2, 5e-5, 0.0),
}.items()}

# The documented ``custom`` recipe for a task the registry does not know: the released
# script's most common setting (lr 5e-3, wd 5e-5 on 9 of the 19 tasks; with drop-path 0 on 6).
CUSTOM = "custom"
CUSTOM_RECIPE = Recipe(lr=5e-3, weight_decay=5e-5, drop_path=0.0)
EXPLICIT = "explicit"  # lr and weight decay given as config arguments


def idat_recipe(name: str) -> Recipe | None:
  """The iDAT recipe of a VTAB-1K task (or alias), ``custom``, or None if there is none."""
  if name == CUSTOM:
    return CUSTOM_RECIPE
  key = name.strip().lower()
  return IDAT_RECIPES.get(ALIASES.get(key, key))


def _fmt(x: float) -> str:
  return f"{x:g}"


def recipe_label(source: str, name: str, task: str) -> str:
  """``config.optim.recipe``: ``'<config>:<recipe name>@<task it was chosen for>'``."""
  return f"{source}:{name}@{task}"


def _parse_label(label: str) -> tuple[str, str, str | None]:
  source, _, rest = label.partition(":")
  name, at, chosen_for = rest.partition("@")
  return source, name, (chosen_for if at else None)


def describe_recipe(config: Any) -> str:
  """Human-readable recipe in force and where each value came from (logged at run start).

  Reads ``config.optim.recipe`` (see :func:`recipe_label`; set by the config file) and
  compares the run's actual lr / weight decay / drop-path with that recipe, so a value
  changed on the command line, or a task changed with ``--config.data.task`` after the
  config picked its recipe, is said so instead of passing silently.
  """
  o = config.optim
  label = o.get("recipe", "") or ""
  task = config.data.task
  models = config.get("models", {})
  drop = {name: m.drop_path for name, m in models.items()
          if name in _model_names(config) and "drop_path" in m}
  values = dict(lr=o.lr, weight_decay=o.weight_decay)
  source, name, chosen_for = _parse_label(label)
  lines = []
  recipe = None
  if not label:
    lines.append(f"recipe: the values set in the config file (method {config.method}, task "
                 f"{task!r})")
  elif source != "idat_vtab":
    lines.append(f"recipe: {name or label} (configs/{source}.py) for task {task!r}")
  elif name == EXPLICIT:
    lines.append(f"recipe: lr and weight decay given explicitly ({source} arguments) for "
                 f"task {task!r}, which has no registered recipe")
  elif name == CUSTOM:
    recipe = CUSTOM_RECIPE
    lines.append(f"recipe: the documented '{CUSTOM}' recipe ({source}; lr "
                 f"{_fmt(recipe.lr)}, weight decay {_fmt(recipe.weight_decay)}, drop-path "
                 f"{_fmt(recipe.drop_path)}) for task {task!r}")
  else:
    recipe = idat_recipe(name)
    origin = IDAT_SOURCE if recipe is not None else "unknown recipe name"
    lines.append(f"recipe: {source} recipe of VTAB-1K task {name!r} ({origin}) for task "
                 f"{task!r}")
    if recipe is not None and name != chosen_for:
      lines.append(f"  note: borrowed with {source}:recipe={name}")
  if chosen_for is not None and chosen_for != task:
    lines.append(f"  WARNING: the recipe was chosen for task {chosen_for!r} but the run's task "
                 f"is {task!r} (changed with --config.data.task?). Use {source}:task={task} "
                 "so that task's own recipe (or the explicit/custom rule) applies")
  rule = f"no-decay rule {o.get('decay_mask', 'torch')}" if o.name == "adamw" else "MoCo-v3"
  cooldown = f" + {o.cooldown_epochs} cooldown" if o.cooldown_epochs else ""
  accum = f" x {o.accum_steps} accumulated" if o.accum_steps > 1 else ""
  in_force = (f"  in force: lr {_fmt(values['lr'])}, weight decay "
              f"{_fmt(values['weight_decay'])}"
              + "".join(f", drop-path {_fmt(v)} ({k})" for k, v in drop.items())
              + f"; {o.name} ({rule}), {o.schedule}, {o.epochs} epochs{cooldown}, warmup "
              f"{o.warmup_epochs}, batch {config.batch_size}{accum}")
  lines.append(in_force)
  if recipe is not None:
    expected = dict(lr=recipe.lr, weight_decay=recipe.weight_decay)
    for key, value in values.items():
      if value != expected[key]:
        lines.append(f"  overridden: {key.replace('_', ' ')} {_fmt(value)} (recipe: "
                     f"{_fmt(expected[key])})")
    for model, value in drop.items():
      if value != recipe.drop_path:
        lines.append(f"  overridden: drop-path of the {model} {_fmt(value)} (recipe: "
                     f"{_fmt(recipe.drop_path)})")
  return "\n".join(lines)


def _model_names(config: Any) -> tuple[str, ...]:
  """The config's model blocks that the method trains (teacher only for iDAT)."""
  if config.method == "idat":
    return ("student", "teacher")
  if config.method == "linear_probe":
    return ()
  return ("student",)
