r"""iDAT on VTAB-1K: the released recipe (JCruan519/iDAT ``train_vtab_onlinekd.sh``).

Student ViT-B/16 and teacher ViT-S/16 from the AugReg in21k ``.npz`` files, gist_seq
adapters + heads trainable, loss CE(s) + CE(t) + MSE(z_s, z_t), global batch 64 with
drop-last, 100 epochs + 10 cooldown epochs, timm warmup/cosine stepped per epoch, AdamW with
decay on kernels only, student evaluated on the test split every epoch.

    python -m idat_jax.main --config configs/idat_vtab.py:task=dtd --workdir runs/idat/dtd \
      --config.data.root=/data/vtab-1k

(both AugReg files are fetched on first use; ``--config.models.student.checkpoint=PATH|NAME|URL``
overrides either).

Arguments (``:key=value,...``):
  task      one of the 19 VTAB-1K folder names (aliases cifar100, flowers102, pets accepted),
            or any folder task under data.root (``<root>/<task>/{train800val200,test}.txt``;
            the class count is read from the data: ``task.json``, else the largest label + 1)
  lr, wd, drop_path
            override the task's recipe. A task without a registered recipe needs lr and wd
            (drop_path defaults to 0), or recipe=custom
  recipe    whose per-task (lr, wd, drop-path) to use: '' (the task's own), a VTAB-1K task
            name, or 'custom' = lr 5e-3, wd 5e-5, drop-path 0 (the released script's most
            common setting). The recipe in force and its origin are logged at the start of
            every run (idat_jax.data.vtab.describe_recipe)
  method    idat (default) or a baseline: adapter (gist_seq adapter-tuning alone, no teacher),
            head_only (was linear_probe), full, lora, ssf, bitfit
  backend   folder (NOAH/SSF layout under data.root), tfds (prepared TFDS dir) or synthetic
            (random images of the task's real sizes: speed runs without the data)
  loss      mse (released script) or kl (temperature 5, KL(teacher || student), no T^2)
  adapter   gist_seq_adapter | gist_shared_par_adapter | adaptformer
  seed      random seed (42 as the reference)
  eval_every  evaluate the student on the test split every N epochs (1 = the reference; the
            per-epoch test evaluation is ~90% of the protocol's compute, see docs/performance.md)
  ckpt_dir  directory where the two AugReg files are looked for under their official names
            (default 'pretrained'); a file that is not there is downloaded into the cache
            (idat_jax/checkpoints/pretrained.py: augreg-in21k-B/16, augreg-in21k-S/16);
            'none' starts both models from random weights (speed runs only)
  dtype     compute dtype of both models: bfloat16 (default; the reference trains under fp16
            autocast) or float32. Parameters and optimizer state are float32 either way.
"""

from idat_jax import config_lib
from idat_jax.data import vtab

STUDENT_NPZ = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
TEACHER_NPZ = "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz"

# Per-task (lr, weight decay, drop-path) of the released script (identical to SSF's).
TASK_HPARAMS = {name: (r.lr, r.weight_decay, r.drop_path)
                for name, r in vtab.IDAT_RECIPES.items()}
BASELINES = ("adapter", "head_only", "full", "lora", "ssf", "bitfit")
# 'linear_probe' was the old name of head_only (head-only tuning); it still works, with a
# deprecation warning from the models layer, and is not the WeCoLoRA linear_probe method.
DEPRECATED_BASELINES = ("linear_probe",)


def _recipe(a) -> tuple[float, float, float, str]:
  """(lr, wd, drop-path, recipe label) of the arguments; see the module docstring."""
  task = vtab.canonical_name(a.task) if vtab.idat_recipe(a.task) is not None else a.task
  explicit = {k: float(v) for k, v in (("lr", a.lr), ("wd", a.wd), ("drop_path", a.drop_path))
              if v is not None}
  if a.recipe:
    recipe = vtab.idat_recipe(a.recipe)
    if recipe is None:
      raise ValueError(f"configs/idat_vtab.py: unknown recipe {a.recipe!r}; expected "
                       f"'{vtab.CUSTOM}' or one of {sorted(vtab.IDAT_RECIPES)}")
    name = vtab.CUSTOM if a.recipe == vtab.CUSTOM else vtab.canonical_name(a.recipe)
  elif vtab.idat_recipe(task) is not None:
    recipe, name = vtab.idat_recipe(task), task
  elif "lr" in explicit and "wd" in explicit:
    recipe, name = vtab.Recipe(explicit["lr"], explicit["wd"], 0.0), vtab.EXPLICIT
  else:
    raise ValueError(
        f"configs/idat_vtab.py: task {a.task!r} has no registered recipe (the 19 VTAB-1K tasks "
        f"have one): give its learning rate and weight decay, e.g. "
        f"--config configs/idat_vtab.py:task={a.task},lr=5e-3,wd=5e-5 (drop_path=0.1 "
        f"optional), or use the documented default with :task={a.task},recipe=custom")
  return (explicit.get("lr", recipe.lr), explicit.get("wd", recipe.weight_decay),
          explicit.get("drop_path", recipe.drop_path),
          vtab.recipe_label("idat_vtab", name, task))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, task="dtd", method="idat", backend="folder", loss="mse",
                           adapter="gist_seq_adapter", seed=42, ckpt_dir="pretrained",
                           eval_every=1, dtype="bfloat16", lr=None, wd=None, drop_path=None,
                           recipe="")
  # Registered tasks by their folder name; a user's folder task exactly as given.
  task = vtab.canonical_name(a.task) if vtab.idat_recipe(a.task) is not None else a.task
  if not task or "/" in task:
    raise ValueError(f"configs/idat_vtab.py: task {a.task!r} must be a folder name under "
                     "data.root (no '/')")
  lr, wd, drop_path, recipe = _recipe(a)

  c = config_lib.base_config()
  c.seed = a.seed
  c.data.backend = a.backend
  c.data.task = task
  c.data.image_size = 224
  c.data.normalization = "inception"

  if a.dtype not in ("bfloat16", "float32"):
    raise ValueError(f"dtype must be bfloat16 or float32, got {a.dtype!r}")
  ckpt = "" if a.ckpt_dir == "none" else a.ckpt_dir.rstrip("/") + "/"
  c.models.student = config_lib.model_config("B/16", ckpt and ckpt + STUDENT_NPZ, a.adapter)
  c.models.teacher = config_lib.model_config("S/16", ckpt and ckpt + TEACHER_NPZ, a.adapter)
  for m in (c.models.student, c.models.teacher):
    m.drop_path = drop_path   # the reference applies the task's drop-path to both models
    m.dtype = a.dtype

  if a.method == "idat":
    c.method = "idat"
    c.idat.distill_loss = a.loss
  elif a.method in BASELINES + DEPRECATED_BASELINES:
    c.method = "supervised"
    c.models.student.tuning.mode = a.adapter if a.method == "adapter" else a.method
  else:
    raise ValueError(f"unknown method {a.method!r}; expected idat or one of {BASELINES}")

  c.batch_size = 64
  c.eval_batch_size = 256
  c.optim.update(dict(name="adamw", lr=lr, weight_decay=wd, b1=0.9, b2=0.999, eps=1e-8,
                      schedule="timm_cosine_epoch", epochs=100, cooldown_epochs=10,
                      warmup_epochs=10, warmup_lr=1e-7, min_lr=1e-8, decay_mask="torch",
                      recipe=recipe))
  c.eval_every_epochs = a.eval_every   # the last epoch is always evaluated
  c.log_every_steps = 15
  return c
