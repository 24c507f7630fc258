r"""Export a run's trained model(s) as Google-format ``.npz`` files (the official ViT layout).

    python -m idat_jax.export --workdir RUN [--step N] --out FILE.npz [--merge-lora] [--peft-only]

The run is rebuilt from ``RUN/config.json``: the pretrained files named there are read again
(frozen weights are not in the checkpoint) and the checkpoint's trainable parameters (step
``N``, default the latest) are put in. Run it from the directory the training ran in when the
config names pretrained files by relative paths.

What is written, per method:

* ``supervised`` (adapter, LoRA, SSF, BitFit, full, linear_probe baselines): the student, to
  ``FILE.npz``.
* ``idat``: student and teacher, to ``FILE.student.npz`` and ``FILE.teacher.npz``.
* ``wecolora``: the distilled student (no head), to ``FILE.npz``.
* ``linear_probe`` (WeCoLoRA probe): the probed backbone with the BatchNorm folded into the
  linear head, i.e. a plain ViT classifier that computes the probe's evaluation, to
  ``FILE.npz``.

``--merge-lora`` folds LoRA into the base kernels (``W + scale * a @ b``), so timm or any
official-layout reader computes the tuned model; without it LoRA matrices are written as extra
entries, which such readers ignore. Adapters and SSF cannot be folded into a plain ViT: they are
always written as extra entries (``.../adapter/{down,up}``, ``.../ssf/...``) that
``idat_jax.models.build_vit`` with the run's tuning mode reads back. ``--peft-only`` writes
only the parameters the run trained (adapters / LoRA / SSF and the head; the whole model for
full fine-tuning): combine them with the pretrained file named in the config.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from idat_jax import checkpoints as ckpt_io
from idat_jax import config_lib, fileio
from idat_jax.errors import IdatError
from idat_jax.tree_util import flatten

CONFIG_FILE = "config.json"
PROBE_BN_EPSILON = 1e-6  # MAE's BatchNorm1d(eps=1e-6) in front of the probe head


def _one_line(error: Exception | str) -> str:
  return " ".join(str(error).split())


class ExportError(ValueError):
  """The run cannot be exported as asked (the message names the run and what to do)."""


def _merge_defaults(defaults: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
  """``loaded`` with keys it lacks taken from ``defaults`` (runs recorded by older versions)."""
  out = dict(loaded)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
      out[key] = _merge_defaults(value, out[key])
  return out


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run trained with (``<workdir>/config.json``), completed with defaults."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not fileio.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a training run's work "
                            "dir (python -m idat_jax.main writes config.json there)")
  try:
    loaded = json.loads(fileio.read_text(path))
  except ValueError as e:
    raise ExportError(f"{path}: not valid JSON ({e})") from None
  return ml_collections.ConfigDict(_merge_defaults(config_lib.base_config().to_dict(), loaded))


def _read_checkpoint(workdir: str, step: int | None) -> tuple[dict[str, Any], dict[str, Any],
                                                              int]:
  directory = os.path.join(workdir, "checkpoints")
  state, meta = ckpt_io.read_run_checkpoint(directory, step)
  return state, meta, int(np.asarray(state["step"]))


def _num_classes(config: ml_collections.ConfigDict, trainable: Mapping[str, Any]) -> int:
  """The run's class count: its config, else its trained head, else the data."""
  if config.data.num_classes is not None:
    return int(config.data.num_classes)
  for name, value in flatten(trainable).items():
    if name.endswith("head/kernel"):
      return int(np.shape(value)[-1])
  from idat_jax.data import inputs
  return int(inputs.build_source(config, config.data.train_split).num_classes)


def trained_models(workdir: str, step: int | None = None, *, peft_only: bool = False
                   ) -> tuple[ml_collections.ConfigDict, dict[str, dict[str, Any]],
                              dict[str, Any]]:
  """(config, {model name: full parameter tree}, facts) of a run's checkpoint, on the host.

  ``peft_only``: only the trained parameters, without reading any pretrained file. ``facts``
  holds the step, the method and the run's other variable collections (BatchNorm statistics).
  """
  from idat_jax import sharding as shd
  from idat_jax import train
  from idat_jax.methods import build_method
  from idat_jax.training import trainable as tr

  workdir = fileio.abspath(workdir)  # Orbax reads absolute paths only
  config = read_run_config(workdir)
  state, meta, restored_step = _read_checkpoint(workdir, step)
  trained = state["trainable"]
  num_classes = _num_classes(config, trained)
  config.num_devices = 1
  facts = dict(step=restored_step, method=config.method, extra=state.get("extra") or {},
               meta=meta)
  if peft_only:
    return config, {k: jax.tree.map(np.asarray, v) for k, v in trained.items()}, facts

  method = build_method(config)
  method.num_classes = num_classes  # the run's data fact (the config keeps the user's value)
  params, masks, _, _ = train.load_models(method, jax.random.key(config.seed), shd.make_mesh(1))
  expected, frozen = tr.partition(jax.device_get(params), masks)
  want, got = flatten(expected), flatten(trained)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if np.shape(want[k]) != np.shape(got[k]))
  if missing or extra or wrong:
    detail = "; ".join(
        part for part in (
            missing and f"not in the checkpoint: {missing[:4]}",
            extra and f"not in the rebuilt model: {extra[:4]}",
            wrong and "shape differs: " + ", ".join(
                f"{k} {np.shape(got[k])} vs {np.shape(want[k])}" for k in wrong[:4]))
        if part)
    raise ExportError(f"the checkpoint in {workdir} (step {restored_step}) does not match the "
                      f"models rebuilt from its {CONFIG_FILE}: {detail}")
  full = jax.device_get(tr.combine(jax.tree.map(np.asarray, trained), frozen))
  return config, full, facts


def _models_to_write(config, params: Mapping[str, Any], facts: Mapping[str, Any],
                     peft_only: bool) -> dict[str, dict[str, Any]]:
  """{output name: tree}: the models the run trained, in the official layout."""
  if config.method == "linear_probe":
    return {"probe": probe_classifier(params, facts["extra"], backbone=not peft_only)}
  out = {name: tree for name, tree in params.items() if jax.tree.leaves(tree)}
  if config.method == "wecolora":
    out.pop("teacher", None)  # frozen: the teacher file itself
  if not out:
    raise ExportError(f"the run (method {config.method}) trained no parameters to export")
  return out


def probe_classifier(params: Mapping[str, Any], extra: Mapping[str, Any], *,
                     backbone: bool = True) -> dict[str, Any]:
  """The probed backbone with BatchNorm (no affine) folded into the linear head.

  At evaluation the probe computes ``((x - mean) / sqrt(var + eps)) @ W + b`` on the class
  token after the final norm; ``x @ (W / s) + (b - (mean / s) @ W)`` with ``s = sqrt(var +
  eps)`` is the same affine map, so the result is a plain ViT classifier (token pooling).
  """
  head = params["probe"]["head"]
  stats = flatten(extra.get("probe", {}))
  mean = [v for k, v in stats.items() if k.endswith("/mean")]
  var = [v for k, v in stats.items() if k.endswith("/var")]
  if len(mean) != 1 or len(var) != 1:
    raise ExportError(f"the probe's BatchNorm statistics were not found in the checkpoint "
                      f"(collections: {sorted(stats)})")
  w = np.asarray(head["kernel"], np.float64)
  s = np.sqrt(np.asarray(var[0], np.float64) + PROBE_BN_EPSILON)
  kernel = w / s[:, None]
  bias = np.asarray(head["bias"], np.float64) - (np.asarray(mean[0], np.float64) / s) @ w
  folded = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
  if not backbone:
    return {"head": folded}
  tree = {k: v for k, v in params["backbone"].items() if k != "head"}
  tree["head"] = folded
  return tree


def output_paths(out: str, names: list[str]) -> dict[str, str]:
  """One model: ``out`` itself; several: ``<out without .npz>.<name>.npz`` each."""
  if len(names) == 1:
    return {names[0]: out}
  stem = out[:-4] if out.endswith(".npz") else out
  return {name: f"{stem}.{name}.npz" for name in names}


def _lora_scale(config, name: str) -> float:
  models = config.models
  block = models[name] if name in models else models.student
  return float(block.tuning.lora_scale)


def check_destination(out: str) -> None:
  """Refuses an ``--out`` that cannot become the file(s), before any model is rebuilt: not a
  ``.npz`` name (the loaders pick the format by extension), an existing directory, or a folder
  that does not exist or cannot be written."""
  if not out.endswith(".npz"):
    raise ExportError(f"--out {out}: must end in .npz (the checkpoint readers choose the format "
                      f"by the extension), e.g. --out {out.rstrip('/') or 'model'}.npz")
  if fileio.isdir(out):
    raise ExportError(f"--out {out} is a directory: give a file name, e.g. "
                      f"{os.path.join(out, 'model.npz')}")
  if fileio.is_remote(out):
    return
  folder = os.path.dirname(os.path.abspath(out))
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ExportError(f"--out {out}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ExportError(f"--out {out}: {existing} is not writable (permissions or a read-only "
                      "file system); choose another --out")


def export_run(workdir: str, out: str, *, step: int | None = None, merge_lora: bool = False,
               peft_only: bool = False) -> dict[str, str]:
  """Writes the run's trained model(s) (see the module docstring); {model name: path}.

  Each file is written atomically: a failed write (a full disk) leaves an earlier file of the
  same name as it was."""
  if merge_lora and peft_only:
    raise ExportError("--merge-lora and --peft-only exclude each other: merging needs the "
                      "pretrained kernels that a PEFT-only file leaves out")
  check_destination(out)
  config, params, facts = trained_models(workdir, step, peft_only=peft_only)
  models = _models_to_write(config, params, facts, peft_only)
  paths = output_paths(out, sorted(models, key=lambda n: (n != "student", n)))
  for path in paths.values():
    if fileio.isdir(path):
      raise ExportError(f"{path} is a directory: choose another --out")
  for name, path in paths.items():
    tree = models[name]
    has_lora = any("/lora/" in k for k in flatten(tree))
    if merge_lora and has_lora:
      ckpt_io.export_npz(tree, path, merge_lora=True, lora_scale=_lora_scale(config, name))
    else:
      if has_lora and not peft_only:
        logging.warning("%s keeps the LoRA matrices as extra entries: readers of the official "
                        "layout (timm) ignore them; pass --merge-lora to fold them in", path)
      ckpt_io.save_npz(tree, path)
    logging.info("wrote %s (%s of %s, step %d, %d arrays)", path, name, workdir,
                 facts["step"], len(flatten(tree)))
  return paths


def main(argv: list[str] | None = None) -> dict[str, str]:
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m idat_jax.export",
      description="Export a training run's model(s) as Google-format .npz files.")
  parser.add_argument("--workdir", required=True,
                      help="the training run's work dir (holds config.json and checkpoints/)")
  parser.add_argument("--out", required=True,
                      help="output .npz (iDAT: <out>.student.npz and <out>.teacher.npz)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                      help="fold LoRA into the base kernels")
  parser.add_argument("--peft-only", "--peft_only", dest="peft_only", action="store_true",
                      help="write only the trained parameters (PEFT modules and head)")
  args = parser.parse_args(argv)
  try:
    paths = export_run(args.workdir, args.out, step=args.step, merge_lora=args.merge_lora,
                       peft_only=args.peft_only)
  except (ValueError, IdatError) as e:  # ExportError and the project's user errors
    parser.exit(1, f"error: {_one_line(e)}\n")
  except OSError as e:  # the environment: a missing run, permissions, a full disk
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      what += ": free space and export again (an earlier file of that name is kept as it was)"
    parser.exit(1, f"error: export of {args.workdir} to {args.out} failed{where}: "
                   f"{_one_line(what)}\n")
  for name, path in paths.items():
    print(f"{name}: {path}")
  return paths


if __name__ == "__main__":
  main()
