"""Shared config defaults. Config files (``configs/*.py``) start from :func:`base_config`.

Every key a run may set is declared here, so configs can be locked and a misspelled
``--config.x.y=v`` override is an error instead of a silently ignored field.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from idat_jax.errors import ConfigError

FieldRef = ml_collections.FieldReference


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``'task=dtd,seed=1'`` -> ConfigDict, typed by the defaults (big_vision's convention)."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(f"config argument {item!r} is not key=value (in {arg!r})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return out


def tuning_config(mode: str = "gist_seq_adapter") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      mode=mode,                 # gist_seq_adapter | gist_shared_par_adapter | adaptformer |
                                 # lora | ssf | bitfit | head_only | full
      train_head=True,
      adapter_dim=4,
      adapter_scale=FieldRef(None, field_type=float),  # None: 1 (sequential) / 0.1 (parallel)
      adapter_init_std=0.02,
      lora_rank=4,
      lora_targets="enhanced",   # 'enhanced' (q,k,v,out,fc1,fc2), 'plain' (q,v), or a list
      lora_scale=1.0,
  ))


def model_config(variant: str = "B/16", checkpoint: str = "",
                 mode: str = "gist_seq_adapter") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      variant=variant,           # 'B/16', 'S/16', ... or 'custom' with the fields below
      checkpoint=checkpoint,     # pretrained .npz / .safetensors / .pth; '' = random init
      width=FieldRef(None, field_type=int),
      depth=FieldRef(None, field_type=int),
      num_heads=FieldRef(None, field_type=int),
      mlp_dim=FieldRef(None, field_type=int),
      patch_size=FieldRef(None, field_type=int),
      pool="token",
      dropout=0.0,
      drop_path=0.0,
      head_init_std=0.02,        # timm's trunc_normal(0.02) head as in iDAT; 0 = zeros
      dtype="float32",           # compute dtype; 'bfloat16' keeps params/optimizer in f32
      remat=False,
      attention_impl="auto",     # auto | xla | cudnn
      tuning=tuning_config(mode),
  ))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"               # train | eval
  c.method = "supervised"
  c.seed = 42
  # Multi-process runs (TPU VM slices, multi-node GPU, scripts/launch_local.sh on CPU): see
  # README "Multi-host" and idat_jax.sharding.initialize_distributed. Unset values come from
  # $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID, else JAX's cluster
  # auto-detection (on a TPU VM: enabled=True alone is the zero-argument call).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False,             # True: jax.distributed.initialize (also on when num_processes > 1)
      coordinator_address="",    # host:port of process 0
      num_processes=0,           # 0: from the environment / auto-detection
      process_id=-1,             # -1: from the environment / auto-detection
      initialization_timeout_s=300,  # how long to wait for every process to join
      heartbeat_timeout_s=60,    # a silent peer for this long ends every process with an error
      shutdown_timeout_s=60,     # the exit barrier's wait for the other processes
      cpu_collectives="gloo",    # cross-process collectives of the CPU backend ('none': off)
  ))
  c.num_devices = FieldRef(None, field_type=int)  # use only the first N devices (tests)

  c.data = ml_collections.ConfigDict(dict(
      backend="folder",          # folder | tfds | image_folder | tfds_images | synthetic
      root="",                   # folder backend: <root>/<task>/{train800val200,test}.txt
      tfds_data_dir="",          # tfds backend: prepared TFDS data dir ('' = TFDS default)
      task="dtd",
      num_classes=FieldRef(None, field_type=int),  # None: from the task registry
      train_split="train800val200",
      eval_split="test",
      image_size=224,
      normalization="inception",  # inception: (x/255-0.5)/0.5 ; imagenet: ImageNet mean/std
      cache_dir="",              # decoded+resized uint8 cache, local ('' = <workdir>/../cache;
                                 # ~/.cache/idat_jax/cache for a gs:// work dir)
      augment=False,             # streamed RandomResizedCrop + flip (WeCoLoRA distillation)
      crop_scale=(0.2, 1.0),
      few_shot_ratio=1.0,        # image_folder / tfds_images: class-balanced fraction kept
      few_shot_seed=12,
      stratified_split=0.0,      # >0: train = this stratified fraction of train_split, eval =
      stratified_seed=0,         # the rest (WeCoLoRA's RESISC45 protocol: 0.1, seed 0)
      eval_resident_mb=1024,     # keep the eval set on device when it fits this budget
  ))

  c.models = ml_collections.ConfigDict(dict(
      student=model_config("B/16"),
      teacher=model_config("S/16"),
  ))

  c.idat = ml_collections.ConfigDict(dict(
      distill_loss="mse",        # mse (released script) | kl (KL(p_t||p_s) at temperature)
      temperature=5.0,
      student_weight=1.0, teacher_weight=1.0, distill_weight=1.0,
  ))

  c.wecolora = ml_collections.ConfigDict(dict(
      reduction=2,               # r: the student keeps teacher blocks 0, r, 2r, ...
      student="lora",            # lora (WeCoLoRA) | weco_kd (copied, fully trained) | no_copy
      loss="last",               # last: last block vs last block | segments: block k vs r*k+r-1
      feature="auto",            # auto (pre_norm for lora, post_norm for the baselines) |
                                 # pre_norm | post_norm
      export_merged=True,        # write <workdir>/student_merged.npz (LoRA folded in) at the end
  ))
  c.probe = ml_collections.ConfigDict(dict(
      reduction=2,               # the probed backbone keeps teacher blocks 0, r, ... (1: teacher)
      student_run="",            # a wecolora work dir whose student weights are merged in
      student_step=FieldRef(None, field_type=int),  # its checkpoint step (None: latest)
      transform="direct",        # the data set's probe preprocessing (data/probe_transforms.py):
                                 # resize_crop | cxr | resisc45 | direct
      train_augment=True,        # random train transform (cxr, resisc45): stream images and run
                                 # the backbone per step; False: cache eval-transform features
  ))

  c.batch_size = 64              # global, drop-last
  c.eval_batch_size = 256
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",              # adamw | lars
      lr=1e-3,
      weight_decay=5e-5,
      b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.9,              # lars
      trust_coefficient=0.001,   # lars
      schedule="timm_cosine_epoch",  # timm_cosine_epoch | timm_cosine_step | half_cycle_cosine | constant
      epochs=100,
      cooldown_epochs=10,        # timm's create_scheduler trains epochs + cooldown at min_lr
      warmup_epochs=10,
      warmup_lr=1e-7,
      min_lr=1e-8,
      accum_steps=1,
      # AdamW's no-decay rule (training/optim.weight_decay_mask): torch = timm's
      # param_groups_weight_decay with the model's skip list (iDAT: no decay for ndim <= 1,
      # biases, cls, pos_embedding) | mae = timm 0.3.2 add_weight_decay without a skip list
      # (WeCoLoRA: cls and pos_embedding decay) | all | none | a regex of decayed names.
      # LARS always uses MoCo-v3's rule (ndim > 1 decays).
      decay_mask="torch",
      # Where lr / weight_decay (and drop-path) come from, logged at the start of a run
      # (idat_jax.data.vtab.describe_recipe): '<config>:<recipe>@<task chosen for>', e.g.
      # 'idat_vtab:dtd@dtd' (a registered VTAB-1K recipe), 'idat_vtab:custom@my_task' (the
      # documented default), 'idat_vtab:explicit@my_task' (lr and wd given as arguments);
      # '' = the config file's own values.
      recipe="",
  ))

  c.eval_every_epochs = 1        # the reference evaluates the student on test every epoch
  c.log_every_steps = 50
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.stop_after_steps = 0         # >0: stop (after checkpointing) at this step; resumable
  c.progress_bar = True
  # TensorBoard event files in <workdir>/tensorboard (beside metrics.jsonl, which is always
  # written). A gs:// work dir's events go through tensorboardX's GCS writer, which needs
  # google-cloud-storage.
  c.tensorboard = True
  # Persistent XLA cache: later runs with the same programs (other seeds, resumes, mode=eval)
  # skip compiling. '' = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/../jax_cache (shared
  # by the runs of one sweep, and by a pod's hosts for a gs:// work dir); 'none' = off.
  c.compilation_cache_dir = ""

  c.eval = ml_collections.ConfigDict(dict(step=FieldRef(None, field_type=int)))  # mode=eval
  # A resume whose trajectory config (everything but run controls such as logging, eval
  # frequency, checkpoint cadence and caches) differs from the checkpointed run is refused;
  # True resumes anyway and records the changed keys in the checkpoint meta.
  c.resume_changed = False
  return c


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {rule}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the run controls before any work: values that would crash after setup, or finish
  with exit 0 having lost results (``keep_checkpoints=0`` deleted every checkpoint)."""
  get = config.get
  _require(get("mode", "train") in ("train", "eval"), "mode", get("mode"), "use train or eval")
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_epochs",
              "keep_checkpoints"):
    value = get(key)
    if value is None:
      continue
    _require(isinstance(value, int) and value >= 1, key, value,
             "must be an integer >= 1" + (" (0 would delete every checkpoint of the run)"
                                          if key == "keep_checkpoints" else ""))
  for key in ("eval_every_epochs", "stop_after_steps"):
    value = get(key)
    if value is not None:
      _require(isinstance(value, int) and value >= 0, key, value,
               "must be an integer >= 0 (0: " + ("no evaluation)" if key == "eval_every_epochs"
                                                 else "no early stop)"))
  optim = get("optim") or {}
  checks = (("epochs", 1), ("accum_steps", 1), ("cooldown_epochs", 0), ("warmup_epochs", 0))
  for key, low in checks:
    value = optim.get(key)
    if value is not None:
      _require(isinstance(value, int) and value >= low, f"optim.{key}", value,
               f"must be an integer >= {low}")
  data = get("data") or {}
  if data.get("image_size") is not None:
    _require(int(data["image_size"]) >= 1, "data.image_size", data["image_size"],
             "must be >= 1")
  # Remote (gs://) data: TFDS reads it; the file backends and the decode cache need local disk.
  backend, root = str(data.get("backend", "")), str(data.get("root") or "")
  _require("://" not in root or backend.startswith("tfds"), "data.root", root,
           f"the {backend} backend reads local files: copy the data to every host's disk "
           "(gsutil -m cp -r), or use backend=tfds with data.tfds_data_dir=gs://...")
  cache = str(data.get("cache_dir") or "")
  _require("://" not in cache, "data.cache_dir", cache,
           "must be a local directory (the decode cache is memory-mapped); '' puts it beside a "
           "local work dir, or in ~/.cache/idat_jax/cache for a gs:// one")
  validate_values(config)


OPTIMIZERS = ("adamw", "lars")
SCHEDULES = ("timm_cosine_epoch", "timm_cosine_step", "half_cycle_cosine", "constant")
SEED_MAX = 2**31 - 1  # seeds reach jitted code as int32 under JAX's default (x64 off)


def _number(value: Any) -> float | None:
  """``value`` as a float when it is a real number (not a bool); else None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def _in_range(config: ml_collections.ConfigDict, key: str, low: float, high: float, *,
              low_open: bool = False, high_open: bool = False, optional: bool = True) -> None:
  """config.<key> is a finite number in the interval [low, high] (ends open as asked)."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return  # a config without this key (a method's own section) checks it itself
    node = node[part]
  if node is None and optional:
    return
  value = _number(node)
  interval = (("(" if low_open else "[") + f"{low:g}, " + ("inf" if high == float("inf")
              else f"{high:g}") + (")" if high_open or high == float("inf") else "]"))
  ok = value is not None and math.isfinite(value) and (
      (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
  _require(ok, key, node, f"must be a finite number in {interval}")


def _backend() -> str:
  import jax  # noqa: PLC0415  (only when a config is validated; --helpfull stays fast)
  return jax.default_backend()


def compute_dtypes() -> tuple[str, ...]:
  """The model compute dtypes the default backend runs (XLA:CPU has no float16 matmul)."""
  return ("float32", "bfloat16") if _backend() == "cpu" else ("float32", "bfloat16", "float16")


def validate_values(config: ml_collections.ConfigDict) -> None:
  """Every hyperparameter in its range, checked when the config is parsed: a negative learning
  rate would train by gradient ascent and still write a result row."""
  for key in ("seed", "data.few_shot_seed", "data.stratified_seed"):
    node = config
    for part in key.split("."):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if node is not None:
      _require(isinstance(node, int) and not isinstance(node, bool) and 0 <= node <= SEED_MAX,
               key, node, f"must be an integer in [0, {SEED_MAX}]")
  inf = float("inf")
  _in_range(config, "optim.lr", 0, inf, low_open=True)
  _in_range(config, "optim.weight_decay", 0, inf)
  _in_range(config, "optim.warmup_lr", 0, inf)
  _in_range(config, "optim.min_lr", 0, inf)
  _in_range(config, "optim.b1", 0, 1, high_open=True)
  _in_range(config, "optim.b2", 0, 1, high_open=True)
  _in_range(config, "optim.eps", 0, inf, low_open=True)
  _in_range(config, "optim.momentum", 0, 1, high_open=True)
  _in_range(config, "optim.trust_coefficient", 0, inf, low_open=True)
  optim = config.get("optim") or {}
  for key, allowed in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
    if key in optim:
      _require(optim[key] in allowed, f"optim.{key}", optim[key], f"expected one of {allowed}")
  warmup, epochs = optim.get("warmup_epochs"), optim.get("epochs")
  if isinstance(warmup, int) and isinstance(epochs, int):
    _require(warmup <= epochs + (optim.get("cooldown_epochs") or 0), "optim.warmup_epochs",
             warmup, f"must not exceed the run's epochs ({epochs} + "
             f"{optim.get('cooldown_epochs') or 0} cooldown)")
  for name in (config.get("models") or {}):
    _in_range(config, f"models.{name}.dropout", 0, 1, high_open=True)
    _in_range(config, f"models.{name}.drop_path", 0, 1, high_open=True)
    _in_range(config, f"models.{name}.head_init_std", 0, inf)
    tuning = f"models.{name}.tuning"
    _in_range(config, f"{tuning}.adapter_init_std", 0, inf)
    for key in ("adapter_dim", "lora_rank"):
      value = config.models[name].tuning.get(key)
      _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               f"{tuning}.{key}", value, "must be an integer >= 1")
  for name in (config.get("models") or {}):
    dtype = config.models[name].get("dtype")
    if dtype is not None:
      supported = compute_dtypes()
      _require(dtype in supported, f"models.{name}.dtype", dtype,
               f"this backend ({_backend()}) computes in {', '.join(supported)}")
  _in_range(config, "data.few_shot_ratio", 0, 1, low_open=True)
  _in_range(config, "data.stratified_split", 0, 1, high_open=True)
  scale = (config.get("data") or {}).get("crop_scale")
  if scale is not None:
    values = [_number(v) for v in scale] if isinstance(scale, (tuple, list)) else []
    _require(len(values) == 2 and None not in values and 0 < values[0] <= values[1] <= 1,
             "data.crop_scale", scale, "must be (low, high) with 0 < low <= high <= 1")
  _in_range(config, "idat.temperature", 0, inf, low_open=True)
  for key in ("student_weight", "teacher_weight", "distill_weight"):
    _in_range(config, f"idat.{key}", 0, inf)
