"""The generic trainer: one jit-compiled, data-parallel step for every method.

The method (``idat_jax.methods``) declares models, trainable rules and a loss; this module
initialises and loads the models, splits parameters into a trainable and a frozen tree
(gradients, optimizer state and checkpoints cover only the trainable one), builds the
optimizer and schedule, and runs the loop on a ``data`` mesh:

* the train state is donated and stays on device; metrics are fetched only at log points;
* batch order, dropout and drop-path randomness are pure functions of (seed, step), so a
  restarted run continues bit-identically from its last checkpoint;
* evaluation pads the last batch and masks it, so every example counts exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import uuid
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from idat_jax import checkpoints as ckpt_io
from idat_jax import config_lib, fileio
from idat_jax import sharding as shd
from idat_jax.data import inputs, vtab
from idat_jax.methods import Method, build_method
from idat_jax.models import dummy_images
from idat_jax.tree_util import flatten, unflatten
from idat_jax.training import optim, schedules, trainable as tr
from idat_jax.errors import (CheckpointError, CheckpointNotFoundError, ConfigError, IdatError,
                             RunInterrupted, StorageError)
from idat_jax.training import workdir as wd
from idat_jax.training.checkpointing import Checkpointer, abstract_like
from idat_jax.training.metrics import (MetricWriter, append_result, has_result, json_safe,
                                      to_json)


class NonFiniteLossError(IdatError, FloatingPointError):
  """The loss became NaN or infinite; the message names the last good checkpoint."""


SUMMARY_FILE = "summary.json"  # the finished run's summary (a re-run returns it)
RESULTS_FILE = "results.csv"   # one row per finished run (scripts/vtab_table.py reads them)


@dataclasses.dataclass
class Setup:
  """Everything a run needs besides the loop (also used by tests and the benchmark)."""
  config: ml_collections.ConfigDict
  method: Method
  mesh: jax.sharding.Mesh
  masks: dict[str, Any]
  frozen: dict[str, Any]
  state: dict[str, Any]
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  train_data: inputs.TrainData
  steps_per_epoch: int
  total_epochs: int
  counts: dict[str, tuple[int, int]]
  eval_data: inputs.EvalData | None = None  # from method.prepare_inputs; None: no eval

  def get_eval_data(self) -> inputs.EvalData:
    if self.eval_data is None:
      raise ValueError(f"method {self.method.name!r} has no classifier to evaluate")
    return self.eval_data

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.total_epochs


def init_missing(module) -> Callable:
  """``(rng, example, given_params) -> variables``: initialises only what ``given`` lacks.

  Flax creates a parameter only when its scope does not hold it yet, and a submodule's random
  stream depends on its path, so the adapters and heads come out exactly as a full ``init``
  would make them, while the compiled program holds no random initialisers for the (large)
  pretrained backbone: that compile was most of a run's setup time (docs/performance.md).
  """
  def init(rng, example, given):
    _, variables = module.apply({"params": given} if given else {}, example,
                                rngs={"params": rng}, mutable=True)
    return variables

  return init


def load_models(method: Method, rng: jax.Array, mesh) -> tuple[dict, dict, dict, dict]:
  """Initialises every model, merges its pretrained file, applies its trainable rules.

  Returns parameters, trainable masks, (trainable, total) counts per model, and the models'
  other variable collections (e.g. BatchNorm statistics), which become ``state['extra']``.
  """
  params, masks, counts, extras = {}, {}, {}, {}
  replicated = shd.replicated(mesh)
  specs = method.specs
  files = {}  # model name -> the local file of its checkpoint (a name or URL is fetched once)
  for name, spec in specs.items():  # before any (possibly expensive) model init
    files[name] = ckpt_io.resolve_pretrained(spec.checkpoint, model=name)
    if files[name] and not fileio.exists(files[name]):
      raise CheckpointNotFoundError(
          f"pretrained checkpoint for model '{name}' not found: {spec.checkpoint} "
          f"(resolved to {fileio.abspath(files[name])}). Give a registered name ("
          f"{', '.join(ckpt_io.PRETRAINED)}), a URL, hf-hub:ORG/NAME or a path (README, "
          "'Pretrained checkpoints'), or set "
          f"--config.models.{name}.checkpoint")
  for i, (name, spec) in enumerate(specs.items()):
    example = spec.example_input if spec.example_input is not None else dummy_images(spec.module)
    key = jax.random.fold_in(rng, i)
    given = {}
    if spec.checkpoint:
      try:
        loaded = ckpt_io.load_params(files[name], num_heads=spec.num_heads)
        if spec.load_transform is not None:
          loaded = spec.load_transform(loaded)
        shapes = jax.eval_shape(spec.module.init, key, example)["params"]
        merged, report = ckpt_io.merge_pretrained(shapes, loaded, init_only=spec.init_only,
                                                  ignore_unexpected=spec.ignore_unexpected)
      except (CheckpointError, ValueError, KeyError) as e:
        if isinstance(e, KeyError) or "shape" in str(e).lower():
          raise CheckpointError(
              f"pretrained checkpoint {spec.checkpoint} does not fit model '{name}' "
              f"(config.models.{name}): {e}. Check that models.{name}.variant (or width/"
              "depth/heads/patch_size) matches the file") from e
        raise CheckpointError(f"pretrained checkpoint {spec.checkpoint} of model '{name}' "
                              f"(config.models.{name}) cannot be used: {e}") from e
      logging.info("%s <- %s\n%s", name, spec.checkpoint, report)
      given = unflatten({k: v for k, v in flatten(merged).items()
                         if not isinstance(v, jax.ShapeDtypeStruct)})
    # ``given`` is donated: the checkpoint's arrays pass through without a device copy.
    variables = jax.jit(init_missing(spec.module), out_shardings=replicated,
                        donate_argnums=(2,))(key, example, jax.device_put(given, replicated))
    init = variables["params"]
    collections = {k: v for k, v in variables.items() if k != "params"}
    if collections:
      extras[name] = collections
    params[name] = init
    masks[name] = tr.trainable_mask(init, spec.trainable)
    logging.info("%s", tr.parameter_report(init, masks[name], name))
    counts[name] = (tr.count_params(tr.partition(init, masks[name])[0]), tr.count_params(init))
  return params, masks, counts, extras


def make_schedule(ocfg: ml_collections.ConfigDict, steps_per_epoch: int, total_epochs: int,
                  micro_batches_per_epoch: int | None = None) -> Callable[[Any], Any]:
  """The learning rate as a function of the optimizer step (the count of applied updates).

  ``steps_per_epoch`` counts the micro-batches the trainer runs per epoch (a multiple of
  ``accum_steps``); ``micro_batches_per_epoch`` is the loader's full length before the
  leftover micro-batches are dropped (default: ``steps_per_epoch``). With accumulation the
  WeCoLoRA/MAE reference sets the LR at the first micro-batch of each window, at
  ``epoch + it / len(loader)`` (docs/methods.md, section 6); ``half_cycle_cosine`` maps
  optimizer step ``k`` of an epoch to ``it = k * accum_steps`` over that full length.
  """
  accum = ocfg.accum_steps
  if accum < 1:
    raise ValueError(f"optim.accum_steps must be >= 1, got {accum}")
  opt_steps_per_epoch = steps_per_epoch // accum
  micro = steps_per_epoch if micro_batches_per_epoch is None else micro_batches_per_epoch
  if ocfg.schedule in ("timm_cosine_epoch", "timm_cosine_step"):
    return schedules.timm_cosine_schedule(
        ocfg.lr, steps_per_epoch=opt_steps_per_epoch, num_epochs=total_epochs,
        per_step=ocfg.schedule == "timm_cosine_step", t_initial=ocfg.epochs,
        warmup_epochs=ocfg.warmup_epochs, warmup_lr=ocfg.warmup_lr, min_lr=ocfg.min_lr)
  if ocfg.schedule == "half_cycle_cosine":
    return schedules.half_cycle_cosine(
        ocfg.lr, epochs=ocfg.epochs, warmup_epochs=ocfg.warmup_epochs,
        steps_per_epoch=opt_steps_per_epoch, min_lr=ocfg.min_lr, accum_steps=accum,
        micro_batches_per_epoch=micro)
  if ocfg.schedule == "constant":
    return optax.constant_schedule(ocfg.lr)
  raise ConfigError(f"config.optim.schedule={ocfg.schedule!r}: expected timm_cosine_epoch, "
                    "timm_cosine_step, half_cycle_cosine or constant")


def make_optimizer(ocfg: ml_collections.ConfigDict, schedule, trainable_params):
  """AdamW (no-decay rule ``optim.decay_mask``) or LARS, with gradient accumulation.

  The decay mask is computed on the trainable tree (``{model: params}``), so a trainable
  class token or position embedding decays under ``mae`` (WeCo+KD) and not under ``torch``.
  """
  if ocfg.name == "adamw":
    tx = optim.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                     weight_decay=ocfg.weight_decay,
                     decay_mask=optim.weight_decay_mask(
                         trainable_params, ocfg.get("decay_mask", "torch")))
  elif ocfg.name == "lars":
    tx = optim.lars(schedule, momentum=ocfg.momentum, weight_decay=ocfg.weight_decay,
                    trust_coefficient=ocfg.trust_coefficient)
  else:
    raise ConfigError(f"config.optim.name={ocfg.name!r}: expected adamw or lars")
  if ocfg.accum_steps < 1:
    raise ValueError(f"optim.accum_steps must be >= 1, got {ocfg.accum_steps}")
  return optim.with_accumulation(tx, ocfg.accum_steps) if ocfg.accum_steps > 1 else tx


def compilation_cache_path(config: ml_collections.ConfigDict, workdir: str,
                           current: str | None = None) -> str | None:
  """Where the persistent compilation cache goes: ``config.compilation_cache_dir``; else a
  cache the user already chose (``current``: $JAX_COMPILATION_CACHE_DIR); else
  ``<workdir>/../jax_cache``, shared by a sweep. For a gs:// work dir that is a gs:// directory
  too, and it must be shared: JAX writes cache entries from process 0 only, and the other hosts
  of a pod read them (a host-local cache would never hold an entry on hosts 1..N).
  ``'none'``: no cache."""
  path = config.compilation_cache_dir
  if path == "none":
    return None
  if path or current:
    return path or current
  return inputs.sibling_dir(workdir, "jax_cache")


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache (see :func:`compilation_cache_path`).

  Compiling the models' init, the train step and the eval step is a fixed cost of every run
  (see docs/performance.md); with the cache only the first run of a sweep pays it.
  """
  path = compilation_cache_path(config, workdir, jax.config.jax_compilation_cache_dir)
  if path is None:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.info("persistent compilation cache: %s", path)
  return path


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Mesh, method, inputs, models, optimizer and initial state of a run.

  The method owns its inputs: ``open_inputs`` opens every split before any model init (so a
  missing split stops the run before minutes of setup) and reports the data's facts, which the
  method then holds (``num_classes``, ``train_examples``; the config is not written);
  ``prepare_inputs`` returns the train and eval inputs once the weights are loaded.
  """
  mesh = shd.make_mesh(config.num_devices)
  shd.check_batch_size(config.batch_size, mesh)
  shd.check_batch_size(config.eval_batch_size, mesh, "eval batch size")
  method = build_method(config)
  facts = method.open_inputs(mesh, workdir)
  method.set_data_facts(facts)
  num_examples = facts.num_examples
  steps_per_epoch = num_examples // config.batch_size
  micro_batches_per_epoch = steps_per_epoch  # the loader's length, before dropping leftovers
  if steps_per_epoch < 1:
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {num_examples} "
                      f"training examples of {config.data.task!r} (drop-last leaves no step): "
                      f"use a batch size <= {num_examples}")
  if steps_per_epoch % config.optim.accum_steps:
    # Leftover micro-batches of an epoch are dropped, as in the reference.
    steps_per_epoch -= steps_per_epoch % config.optim.accum_steps
    if not steps_per_epoch:
      raise ConfigError(f"config.optim.accum_steps={config.optim.accum_steps}: an epoch has "
                        f"only {num_examples // config.batch_size} micro-batches of "
                        f"{config.batch_size}; lower accum_steps or batch_size")
  total_epochs = config.optim.epochs + config.optim.cooldown_epochs

  params, masks, counts, extras = load_models(method, jax.random.key(config.seed), mesh)
  train_data, eval_data = method.prepare_inputs(params, mesh, workdir)
  trainable, frozen = tr.partition(params, masks)
  if not jax.tree.leaves(trainable):
    raise ConfigError(f"the trainable rules of method {config.method!r} select no parameter at "
                      "all (models.*.tuning.mode, train_head): nothing would be trained")
  schedule = make_schedule(config.optim, steps_per_epoch, total_epochs,
                           micro_batches_per_epoch)
  tx = make_optimizer(config.optim, schedule, trainable)
  replicated = shd.replicated(mesh)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(trainable)
  state = dict(trainable=trainable, opt=opt_state,
               step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
               extra=extras)
  return Setup(config, method, mesh, masks, frozen, state, tx, schedule, train_data,
               steps_per_epoch, total_epochs, counts, eval_data)


def make_update(method: Method, tx: optax.GradientTransformation, schedule, accum_steps: int = 1):
  """The pure optimisation step ``(state, frozen, batch, rng) -> (state, metrics)``.

  Gradients are taken with respect to the trainable tree only, so frozen weights get neither
  weight-gradient computation nor optimizer state. ``batch`` is the training input's
  ``model_batch`` (e.g. normalised images).
  """
  def update(state, frozen, batch, rng):
    extra = state.get("extra", {})

    def loss_fn(trainable):
      loss, metrics, new_extra = method.loss(tr.combine(trainable, frozen), batch, rng, extra)
      return loss, (metrics, new_extra)

    (_, (metrics, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["trainable"])
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    new_trainable = optax.apply_updates(state["trainable"], updates)
    metrics = dict(metrics, lr=schedule(state["step"] // accum_steps),
                   grad_norm=optax.tree.norm(grads))
    new_state = dict(trainable=new_trainable, opt=opt, step=state["step"] + 1)
    if "extra" in state:
      new_state["extra"] = new_extra
    return new_state, metrics

  return update


def make_train_step(s: Setup) -> Callable:
  """``(state, frozen, data) -> (state, metrics)``, jit-compiled with the state donated.

  ``data`` is the device-resident train set (the batch is gathered inside the step from
  (seed, step)) or, for streamed inputs, the batch itself; the training input makes the
  method's batch of it (``TrainData.batch_in_step``).
  """
  config = s.config
  update = make_update(s.method, s.tx, s.schedule, config.optim.accum_steps)
  seed_key = jax.random.key(config.seed)

  def step_fn(state, frozen, data):
    step = state["step"]
    batch = s.train_data.batch_in_step(data, config.seed, step, s.steps_per_epoch,
                                       config.batch_size)
    return update(state, frozen, batch, jax.random.fold_in(seed_key, step))

  replicated = shd.replicated(s.mesh)
  state_sharding = jax.tree.map(lambda _: replicated, s.state)
  return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sharding, replicated))


def make_eval_step(s: Setup) -> Callable:
  """The jitted eval step on one padded batch (``mask`` marks real examples).

  Top-1 methods get (correct, count) sums; others (``eval_metric`` 'mean_auroc') get the
  batch's float32 logits, labels and mask, replicated, for :func:`evaluate` to rank on the host.
  """
  model_input = s.get_eval_data().model_input
  per_example = s.method.eval_metric != "top1"

  def eval_fn(trainable, frozen, extra, batch):
    x = model_input(batch)
    logits = s.method.predict(tr.combine(trainable, frozen), x, extra)
    if per_example:
      return logits.astype(jnp.float32), batch["label"], batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
    return jnp.sum(correct.astype(jnp.int32)), jnp.sum(batch["mask"].astype(jnp.int32))

  return jax.jit(eval_fn, out_shardings=shd.replicated(s.mesh))


def evaluate(s: Setup, eval_step, state, eval_data: inputs.EvalData) -> dict[str, Any]:
  """The evaluated model's metric over the whole eval split, each example once.

  Returns ``{s.method.eval_metric: value, 'eval_examples': n, ...}``: top-1 (%), or for a
  multi-label probe the mean AUROC (%) over labels plus each label's (``auroc/<name>``),
  computed exactly over all examples (``training/auroc.py``).
  """
  metric = s.method.eval_metric
  if metric == "top1":
    correct = jnp.zeros((), jnp.int32)
    seen = jnp.zeros((), jnp.int32)
    for batch in eval_data:
      c, n = eval_step(state["trainable"], s.frozen, state["extra"], batch)
      correct, seen = correct + c, seen + n
    correct, seen = int(correct), int(seen)
    if seen != eval_data.num_examples:
      raise RuntimeError(f"evaluation counted {seen} examples, expected {eval_data.num_examples}")
    return {"top1": 100.0 * correct / max(seen, 1), "eval_examples": seen}
  if metric != "mean_auroc":
    raise ValueError(f"method {s.method.name!r} reports eval_metric {metric!r}; the trainer "
                     "evaluates 'top1' or 'mean_auroc'")
  from idat_jax.data.multilabel_csv import unpack_labels
  from idat_jax.training.auroc import multilabel_auroc
  scores, packed = [], []
  for batch in eval_data:
    logits, labels, mask = jax.device_get(
        eval_step(state["trainable"], s.frozen, state["extra"], batch))
    mask = np.asarray(mask, bool)
    scores.append(np.asarray(logits)[mask])
    packed.append(np.asarray(labels)[mask])
  scores, packed = np.concatenate(scores), np.concatenate(packed)
  seen = scores.shape[0]
  if seen != eval_data.num_examples:
    raise RuntimeError(f"evaluation counted {seen} examples, expected {eval_data.num_examples}")
  num_labels = scores.shape[1]
  names = s.method.label_names or [str(j) for j in range(num_labels)]
  result = multilabel_auroc(unpack_labels(packed, num_labels), scores, names)
  result["eval_examples"] = seen
  return result


def _restore(s: Setup, ckpt: Checkpointer, step: int | None = None):
  """(state, meta) of ``step``, or of the newest step that restores (see Checkpointer)."""
  return ckpt.restore(step, abstract_like(s.state, shd.replicated(s.mesh)))


def _fetch(pending: list[dict]) -> dict[str, float]:
  """One device->host transfer for all metrics since the last log point; their means."""
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """The work dir's lock for the run's lifetime; process 0 holds it on multi-host runs."""
  lock = wd.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _newest_meta(ckpt: Checkpointer) -> dict[str, Any] | None:
  """Meta of the newest step whose metadata reads (a corrupt one is skipped, and logged)."""
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      return ckpt.read_meta(step)
    except CheckpointError as e:
      logging.warning("%s; trying an older step", e)
  return None


def check_resume(config: ml_collections.ConfigDict, workdir: str, saved_meta: dict[str, Any],
                 current: dict[str, Any]) -> list[str]:
  """The trajectory keys that changed since the checkpointed run; raises :class:`ConfigError`
  unless ``config.resume_changed`` accepts them."""
  saved = saved_meta.get("config")
  if saved is None:
    logging.warning("the checkpoints in %s record no config (an older version wrote them): "
                    "resuming without checking it", workdir)
    return []
  changes = wd.config_changes(saved, current)
  if changes and not config.get("resume_changed", False):
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8
                                      else "")
    raise ConfigError(
        f"work dir {workdir} holds a run with another config ({len(changes)} changed key"
        f"{'s' if len(changes) > 1 else ''}: {shown}). Use a new --workdir, or resume anyway "
        "with --config.resume_changed=True (the change is recorded in the checkpoint)")
  if changes:
    logging.warning("resuming %s with a changed config, as asked (resume_changed): %s", workdir,
                    "; ".join(changes))
  return changes


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    return json.loads(fileio.read_text(path))
  except StorageError:
    raise
  except (OSError, ValueError):
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds a checkpoint); returns the run summary.

  The work dir is locked for the run. A resume must have the same trajectory config as the
  checkpointed run (see :func:`check_resume`); a finished run is not trained again: its
  stored summary is returned and no second result row is written.
  """
  t_start = time.time()
  config_lib.validate(config)
  fileio.exists(workdir)  # a gs:// work dir without its client: one StorageError, not Orbax's
  current = wd.trajectory_config(config)  # the config as given (what a resume must repeat)
  with workdir_lock(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    try:
      return _train(config, workdir, ckpt, current, t_start)
    finally:
      ckpt.close()


def _train(config, workdir, ckpt: Checkpointer, current, t_start) -> dict[str, Any]:
  saved_meta = _newest_meta(ckpt) if ckpt.latest_step() is not None else None
  changes = check_resume(config, workdir, saved_meta, current) if saved_meta else []
  stored = _read_json(os.path.join(workdir, SUMMARY_FILE))
  if (stored and stored.get("finished") and not changes
      and stored.get("step") == ckpt.latest_step()):
    results = os.path.join(workdir, RESULTS_FILE)
    if jax.process_index() == 0 and not has_result(results, stored.get("run_id")):
      # Stopped between the summary and the row: the row is derived from the stored summary.
      append_result(results, stored)
      logging.info("the run in %s had finished; its result row was missing and is added now",
                   workdir)
    else:
      logging.info("the run in %s already finished at step %d: nothing to train, no result "
                   "row added (its summary follows)", workdir, stored["step"])
    return dict(stored, already_finished=True)
  if jax.process_index() == 0:
    wd.write_config_record(config, workdir, fresh=ckpt.latest_step() is None)
  logging.info("%s", vtab.describe_recipe(config))

  s = setup(config, workdir)
  setup_s = time.time() - t_start
  meta = {"best_top1": None, "best_epoch": None, "last_top1": None, "history": [],
          "metric": s.method.eval_metric, "elapsed_s": 0.0, "method": config.method,
          "config": current, "resume_overrides": [], "run_id": uuid.uuid4().hex,
          **s.method.checkpoint_meta()}
  if ckpt.latest_step() is not None:
    s.state, restored = _restore(s, ckpt)
    ckpt.move_aside(ckpt.failed_steps)  # else Orbax skips re-saving those steps (issue 19)
    meta.update(restored)
    logging.info("resumed from step %d in %s", int(s.state["step"]), ckpt.directory)
    if changes:
      meta.setdefault("resume_overrides", []).append(
          {"step": int(s.state["step"]), "changes": changes,
           "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    meta["config"] = current
  start_step = int(s.state["step"])
  prior_elapsed = float(meta.get("elapsed_s") or 0.0)
  metric = s.method.eval_metric

  train_step = make_train_step(s)
  eval_data = None
  if s.method.eval_model is not None and config.eval_every_epochs > 0:
    eval_data = s.get_eval_data()
    eval_step = make_eval_step(s)
  data = s.train_data.resident

  writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True),
                        resume_step=start_step)
  progress = None
  if config.progress_bar and jax.process_index() == 0:
    from tqdm.auto import tqdm
    progress = tqdm(total=s.total_steps, initial=start_step, desc=config.method,
                    dynamic_ncols=True)
  pending: list[dict] = []
  t_log, step_log = time.time(), start_step
  last_good_step = ckpt.latest_step()
  # Wall time per epoch, split at points that already wait for the device (the metric fetch
  # at the epoch's end, the eval result): [epoch, train_s, eval_s, checkpoint_s].
  epoch_times: list[list[float]] = []
  t_epoch = time.time()

  def save(step: int) -> None:
    meta["elapsed_s"] = round(prior_elapsed + time.time() - t_start, 3)
    writer.sync()  # every row up to this checkpoint is kept if the run is resumed from it
    ckpt.save(step, s.state, meta)

  reached = start_step  # the last step whose update was dispatched (reported on Ctrl-C)
  try:
    for step in range(start_step, s.total_steps):
      if data is None:
        data = s.train_data.stream_batch(step, s.steps_per_epoch, config.batch_size)
      s.state, metrics = train_step(s.state, s.frozen, data)
      reached = step + 1
      if s.train_data.resident is None:
        data = None
      pending.append(metrics)
      done = step + 1
      epoch_end = done % s.steps_per_epoch == 0
      stop_now = config.stop_after_steps and done >= config.stop_after_steps
      if done % config.log_every_steps == 0 or epoch_end or stop_now or done == s.total_steps:
        logged = _fetch(pending)
        pending = []
        if not math.isfinite(logged["loss"]):
          raise NonFiniteLossError(
              f"non-finite loss {logged['loss']} between steps {step_log} and {done}; stopping. "
              + (f"The last good checkpoint (step {last_good_step}) is kept in {ckpt.directory}"
                 if last_good_step is not None else
                 f"There is no checkpoint to resume from in {ckpt.directory} yet"))
        now = time.time()
        logged["images_per_s"] = (done - step_log) * config.batch_size / max(now - t_log, 1e-9)
        logged["epoch"] = done / s.steps_per_epoch
        t_log, step_log = now, done
        writer.write(done, logged)
        if progress is not None:
          progress.update(done - progress.n)
          progress.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}",
                               img_s=f"{logged['images_per_s']:.0f}")
      if epoch_end or done == s.total_steps:
        epoch = done // s.steps_per_epoch
        t_eval = time.time()
        times = [epoch, t_eval - t_epoch, 0.0, 0.0]
        if eval_data is not None and (epoch % config.eval_every_epochs == 0
                                      or done == s.total_steps):
          result = evaluate(s, eval_step, s.state, eval_data)
          value = result[metric]
          # What the metric comes with (a multi-label probe: each label's AUROC and the
          # number of labels in the mean) is kept for the last and the best evaluation.
          details = json_safe({k: v for k, v in result.items()
                               if k not in (metric, "eval_examples")})
          meta["last_top1"], meta["last_details"] = value, details
          if meta["best_top1"] is None or value > meta["best_top1"]:
            meta["best_top1"], meta["best_epoch"] = value, epoch
            meta["best_details"] = details
          meta["history"].append([epoch, value])
          writer.write(done, {f"test_{metric}": value, f"best_{metric}": meta["best_top1"],
                              "epoch": epoch, **{f"test_{k}": v for k, v in details.items()}})
          logging.info("epoch %d: test %s %.2f (best %.2f at epoch %d)", epoch, metric, value,
                       meta["best_top1"], meta["best_epoch"])
        t_save = time.time()
        times[2] = t_save - t_eval
        if epoch % config.checkpoint_every_epochs == 0 or done == s.total_steps:
          save(done)
          last_good_step = done
        t_epoch = time.time()
        times[3] = t_epoch - t_save
        epoch_times.append(times)
      if stop_now:
        if last_good_step != done:
          save(done)
        logging.info("stopping at step %d as asked (config.stop_after_steps)", done)
        break
    ckpt.wait()  # a failed write (e.g. a full disk) is reported here, not after the summary
    writer.sync()  # likewise a failed upload of a remote metrics.jsonl (close only logs one)
  except KeyboardInterrupt:
    raise _interrupted(ckpt, reached, s.total_steps) from None
  finally:
    s.train_data.close()
    writer.close()
    if progress is not None:
      progress.close()

  finished = int(s.state["step"]) >= s.total_steps
  summary = s.method.describe()
  # meta keeps the primary metric under best_top1/last_top1 (their historical names); the
  # summary names it: best/last with 'metric', and best_<metric>/last_<metric>.
  best, last = meta["best_top1"], meta["last_top1"]
  summary.update(
      method=config.method, seed=config.seed, metric=metric, best=best, last=last,
      best_epoch=meta["best_epoch"], **{f"best_{metric}": best, f"last_{metric}": last},
      trainable_params=sum(c[0] for c in s.counts.values()),
      total_params=sum(c[1] for c in s.counts.values()),
      epochs=s.total_epochs, wall_time_s=round(prior_elapsed + time.time() - t_start, 2),
      workdir=fileio.abspath(workdir), finished=finished, step=int(s.state["step"]),
      counts=s.counts, setup_s=round(setup_s, 3), epoch_times=epoch_times,
      resume_overrides=meta.get("resume_overrides") or [], run_id=meta["run_id"],
      **{f"last_{k}": v for k, v in (meta.get("last_details") or {}).items()},
      **{f"best_{k}": v for k, v in (meta.get("best_details") or {}).items()})
  if finished and jax.process_index() == 0:
    summary.update(s.method.finalize(
        jax.device_get(tr.combine(s.state["trainable"], s.frozen)), workdir))
    # "Finished" is one fact on disk: summary.json (atomic) first, then the row, which carries
    # the run's id; a rerun after a stop between the two adds the row only if it is missing.
    fileio.write_text(os.path.join(workdir, SUMMARY_FILE), to_json(summary, indent=1))
    results = os.path.join(workdir, RESULTS_FILE)
    if not has_result(results, summary["run_id"]):
      append_result(results, summary)
  return summary


def _interrupted(ckpt: Checkpointer, reached: int, total_steps: int) -> RunInterrupted:
  """Ctrl-C in the loop: the save in flight is completed, and one line says what is kept."""
  try:
    ckpt.wait()
  except (Exception, KeyboardInterrupt):  # noqa: BLE001  (a failed save, or a second Ctrl-C)
    pass
  try:
    kept = ckpt.latest_step()
  except Exception:  # noqa: BLE001
    kept = None
  where = (f"checkpoint of step {kept} kept in {ckpt.directory}" if kept is not None
           else f"no checkpoint written yet in {ckpt.directory}")
  return RunInterrupted(f"interrupted at step {reached} of {total_steps}; {where}; run the "
                        "same command to resume")


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``mode=eval``: restores a checkpoint (latest, or ``config.eval.step``) and evaluates it."""
  config_lib.validate(config)
  fileio.exists(workdir)  # a gs:// work dir without its client: one StorageError, not Orbax's
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not fileio.isdir(ckpt_dir):
    raise CheckpointNotFoundError(f"no checkpoint to evaluate: {ckpt_dir} does not exist; "
                                  "train first, or check --workdir")
  with workdir_lock(workdir):
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints, create=False)
    try:
      if ckpt.latest_step() is None:
        raise CheckpointNotFoundError(f"no checkpoint to evaluate in {ckpt_dir}")
      if jax.process_index() == 0:
        wd.write_config_record(config, workdir, fresh=False)
      s = setup(config, workdir)
      state, meta = _restore(s, ckpt, config.eval.step)
    finally:
      ckpt.close()
    metric = s.method.eval_metric
    result = evaluate(s, make_eval_step(s), state, s.get_eval_data())
  result.update(step=int(state["step"]), metric=metric,
                reported_last_top1=meta.get("last_top1"),
                reported_best_top1=meta.get("best_top1"))
  logging.info("evaluated step %d: %s %.2f (the run reported %s)", result["step"], metric,
               result[metric], meta.get("last_top1"))
  return result


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   step: int | None = None) -> dict[str, Any]:
  """Full parameter trees (model name -> tree) of a checkpointed run, on the host."""
  s = setup(config, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    state, _ = _restore(s, ckpt, step)
  finally:
    ckpt.close()
  return jax.device_get(tr.combine(state["trainable"], s.frozen))
