"""``python -m idat_jax.export`` on finished runs (issue 11, item 6).

Two tiny runs on a user's folder task (digits 5-9 written under an unregistered name, classes
read from the data) with ``configs/idat_vtab.py:task=my_digits,recipe=custom``, from small
random "pretrained" ``.npz`` backbones:

* iDAT: the export writes ``.student.npz`` and ``.teacher.npz``; each loads back into
  ``build_vit`` (adapters and all) and computes the run's own models, the student reproduces
  the run's test top-1, and timm (with the reference's gist adapters filled from the file)
  computes the same logits;
* LoRA: ``--merge-lora`` gives a plain ViT that timm's own ``.npz`` loader reads and that
  reproduces the run's test top-1.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from idat_jax import checkpoints as ckpt_io
from idat_jax import export, train
from idat_jax.data import load_task_split, normalize, write_digits_task
from idat_jax.methods import build_method
from idat_jax.models import build_vit
from idat_jax.tree_util import flatten
from repo_files import load_file
from vit_testing import random_params

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 16
ARCH = {"student": dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=4),
        "teacher": dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)}
EPOCHS = 3


def _idat_vtab():
  return load_file("configs/idat_vtab.py", "idat_vtab_cfg_export")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = tmp_path_factory.mktemp("export")
  write_digits_task(str(path / "data"), name="my_digits", classes=(5, 6, 7, 8, 9),
                    train_size=500, seed=0)
  os.remove(path / "data" / "my_digits" / "task.json")  # a user's task: classes from labels
  for name, arch in ARCH.items():
    model = build_vit("custom", 0, image_size=IMAGE, **arch)
    ckpt_io.save_npz(random_params(model, seed=len(name)), str(path / f"{name}.npz"))
  return path


def _config(root, method):
  c = _idat_vtab().get_config(f"task=my_digits,recipe=custom,method={method},dtype=float32")
  c.data.root = str(root / "data")
  c.data.image_size = IMAGE
  for name, arch in ARCH.items():
    m = c.models[name]
    m.variant = "custom"
    m.checkpoint = str(root / f"{name}.npz")
    for key, value in arch.items():
      m[key] = value
  c.models.student.tuning.lora_rank = 4
  c.optim.update(dict(epochs=EPOCHS, cooldown_epochs=0, warmup_epochs=1, lr=1e-2))
  c.batch_size, c.eval_batch_size, c.num_devices = 50, 100, 1
  c.log_every_steps, c.progress_bar = 10, False
  return c


def _train(root, method):
  config = _config(root, method)
  workdir = str(root / "runs" / method)
  summary = train.train_and_evaluate(config, workdir)
  if not os.path.exists(os.path.join(workdir, "config.json")):  # as idat_jax.main writes it
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(_config(root, method).to_json_best_effort(indent=2))
  assert summary["finished"]
  return config, workdir, summary


@pytest.fixture(scope="module")
def idat_run(root):
  return _train(root, "idat")


@pytest.fixture(scope="module")
def lora_run(root):
  return _train(root, "lora")


@pytest.fixture(scope="module")
def test_split(root):
  images, labels = load_task_split("my_digits", "test", backend="folder",
                                   data_dir=str(root / "data"), image_size=IMAGE)
  return np.asarray(normalize(images, "inception")), labels


def _top1(logits, labels):
  return 100.0 * float(np.mean(np.argmax(logits, -1) == labels))


def _cli(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "idat_jax.export", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_idat_export_writes_student_and_teacher_that_reproduce_the_run(
    idat_run, root, test_split):
  config, workdir, summary = idat_run
  out = str(root / "exported" / "idat.npz")
  result = _cli(["--workdir", workdir, "--out", out])
  assert result.returncode == 0, result.stderr[-3000:]
  paths = {"student": str(root / "exported" / "idat.student.npz"),
           "teacher": str(root / "exported" / "idat.teacher.npz")}
  assert result.stdout.split() == ["student:", paths["student"], "teacher:", paths["teacher"]]

  images, labels = test_split
  trained = train.restore_params(_config(root, "idat"), workdir)
  specs = build_method(_config_with_classes(config)).models()
  for name, path in paths.items():
    loaded = ckpt_io.load_params(path)
    ours, ref = flatten(loaded), flatten(trained[name])
    assert set(ours) == set(ref)
    for k in ref:  # the file holds the run's exact weights, adapters and head included
      np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{name}: {k}")
    # The frozen backbone is the pretrained file's.
    for k, v in flatten(ckpt_io.load_params(str(root / f"{name}.npz"))).items():
      np.testing.assert_array_equal(ours[k], v, err_msg=k)
    logits = np.asarray(specs[name].module.apply({"params": loaded}, images, train=False))
    if name == "student":
      assert _top1(logits, labels) == pytest.approx(summary["last_top1"], abs=1e-9)
    _check_timm_with_adapters(path, name, images, logits)


def _config_with_classes(config):
  c = _config_from(config)
  c.data.num_classes = 5
  return c


def _config_from(config):
  import ml_collections
  return ml_collections.ConfigDict(config.to_dict())


def _check_timm_with_adapters(path, name, images, logits):
  """timm's loader for the ViT, the reference's gist adapters filled from the same file."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  import torch_reference as tref
  arch = ARCH[name]
  model = tref.load_npz(tref.timm_vit(image_size=IMAGE, num_classes=5, **arch), path)
  model = tref.add_gist_adapters(model)
  flat = flatten(ckpt_io.load_params(path))
  with torch.no_grad():
    for i, blk in enumerate(model.blocks):
      p = f"Transformer/encoderblock_{i}/adapter/"
      a = blk.gist_adapter
      a.linear1.weight.copy_(torch.from_numpy(flat[p + "down/kernel"].T.copy()))
      a.linear1.bias.copy_(torch.from_numpy(flat[p + "down/bias"]))
      a.linear2.weight.copy_(torch.from_numpy(flat[p + "up/kernel"].T.copy()))
      a.linear2.bias.copy_(torch.from_numpy(flat[p + "up/bias"]))
    theirs = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(theirs, logits, atol=2e-4, rtol=0, err_msg=name)
  assert np.array_equal(np.argmax(theirs, -1), np.argmax(logits, -1))


def test_lora_export_merged_is_a_plain_vit_timm_reproduces(lora_run, root, test_split):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  import torch_reference as tref
  config, workdir, summary = lora_run
  out = str(root / "exported" / "lora_merged.npz")
  assert export.export_run(workdir, out, merge_lora=True) == {"student": out}
  flat = flatten(ckpt_io.load_params(out))
  assert not any("/lora/" in k for k in flat)
  images, labels = test_split
  model = tref.load_npz(tref.timm_vit(image_size=IMAGE, num_classes=5, **ARCH["student"]), out)
  with torch.no_grad():
    theirs = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  assert _top1(theirs, labels) == pytest.approx(summary["last_top1"], abs=1e-9)
  # The same function as the run's unmerged LoRA model.
  trained = train.restore_params(_config(root, "lora"), workdir)["student"]
  module = build_method(_config_with_classes(config)).models()["student"].module
  ours = np.asarray(module.apply({"params": trained}, images, train=False))
  np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=0)

  # Without --merge-lora the LoRA matrices are kept as extra entries.
  kept = str(root / "exported" / "lora_unmerged.npz")
  export.export_run(workdir, kept)
  assert any("/lora/" in k for k in flatten(ckpt_io.load_params(kept)))


def test_peft_only_holds_exactly_the_trained_parameters(lora_run, idat_run, root):
  from idat_jax.checkpoints import read_run_checkpoint
  for config, workdir, _ in (lora_run, idat_run):
    out = str(root / "exported" / f"{config.method}_peft.npz")
    paths = export.export_run(workdir, out, peft_only=True)
    state, _ = read_run_checkpoint(os.path.join(workdir, "checkpoints"))
    for name, path in paths.items():
      with np.load(path) as f:
        got = dict(f)
      want = flatten(state["trainable"][name])
      assert set(got) == set(want)
      assert all(k.startswith("head/") or "/adapter/" in k or "/lora/" in k for k in got)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_probe_export_is_a_plain_vit_classifier(root, test_split):
  """A linear probe's export: backbone + BatchNorm folded into the head, read by timm."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  import torch_reference as tref
  from idat_jax import config_lib
  c = config_lib.base_config()
  c.method = "linear_probe"
  c.probe.reduction = 1  # the teacher itself
  c.data.update(dict(backend="folder", root=str(root / "data"), task="my_digits",
                     image_size=IMAGE, normalization="inception"))
  c.models.teacher = config_lib.model_config("custom", str(root / "student.npz"), "full")
  for key, value in ARCH["student"].items():
    c.models.teacher[key] = value
  c.optim.update(dict(name="lars", lr=0.5, weight_decay=0.0, schedule="half_cycle_cosine",
                      epochs=EPOCHS, warmup_epochs=1, cooldown_epochs=0, min_lr=0.0))
  c.batch_size, c.eval_batch_size, c.num_devices = 50, 100, 1
  c.progress_bar = False
  workdir = str(root / "runs" / "probe")
  summary = train.train_and_evaluate(c, workdir)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(c.to_json_best_effort(indent=2))
  out = str(root / "exported" / "probe.npz")
  assert export.export_run(workdir, out) == {"probe": out}
  images, labels = test_split
  module = build_vit("custom", 5, image_size=IMAGE, **ARCH["student"])
  logits = np.asarray(module.apply({"params": ckpt_io.load_params(out)}, images, train=False))
  assert _top1(logits, labels) == pytest.approx(summary["last_top1"], abs=1e-9)
  model = tref.load_npz(tref.timm_vit(image_size=IMAGE, num_classes=5, **ARCH["student"]), out)
  with torch.no_grad():
    theirs = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(theirs, logits, atol=2e-4, rtol=0)
  assert _top1(theirs, labels) == pytest.approx(summary["last_top1"], abs=1e-9)


def test_export_of_an_earlier_step(idat_run, root):
  _, workdir, _ = idat_run
  from idat_jax.checkpoints import read_run_checkpoint
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert len(steps) >= 2
  out = str(root / "exported" / "early.npz")
  paths = export.export_run(workdir, out, step=steps[0], peft_only=True)
  state, _ = read_run_checkpoint(os.path.join(workdir, "checkpoints"), steps[0])
  latest, _ = read_run_checkpoint(os.path.join(workdir, "checkpoints"))
  with np.load(paths["student"]) as f:
    head = f["head/kernel"]
  np.testing.assert_array_equal(head, state["trainable"]["student"]["head"]["kernel"])
  assert not np.array_equal(head, latest["trainable"]["student"]["head"]["kernel"])
  with pytest.raises(FileNotFoundError, match="step 999"):
    export.export_run(workdir, out, step=999)


def test_export_errors_name_the_run_and_the_fix(idat_run, root, tmp_path):
  _, workdir, _ = idat_run
  with pytest.raises(export.ExportError, match="exclude each other"):
    export.export_run(workdir, str(tmp_path / "x.npz"), merge_lora=True, peft_only=True)
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    export.export_run(str(tmp_path), str(tmp_path / "x.npz"))
  # A config that does not match the checkpoint (another adapter size).
  bad = tmp_path / "bad_run"
  os.makedirs(bad)
  os.symlink(os.path.join(workdir, "checkpoints"), bad / "checkpoints")
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    record = json.load(f)
  record["models"]["student"]["tuning"]["adapter_dim"] = 8
  with open(bad / "config.json", "w", encoding="utf-8") as f:
    json.dump(record, f)
  with pytest.raises(export.ExportError, match="does not match the models rebuilt"):
    export.export_run(str(bad), str(tmp_path / "x.npz"))
  result = _cli(["--workdir", str(bad), "--out", str(tmp_path / "x.npz")])
  assert result.returncode == 1 and "error: the checkpoint in" in result.stderr


def _mount_tmpfs(target, options):
  """Mounts a tmpfs at ``target`` (root in a sandbox that allows it); False where it cannot."""
  import shutil
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  os.makedirs(target, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                        capture_output=True).returncode == 0


def test_export_destinations_are_checked_in_one_line(idat_run, tmp_path):
  """Issue 19: a directory, a name without .npz, gs:// without the GCS client: one line each,
  exit 1, before any model is rebuilt (before: exit 0 and a file the loaders refuse, or a
  traceback)."""
  _, workdir, _ = idat_run
  (tmp_path / "folder").mkdir()
  (tmp_path / "afile").write_text("x")
  cases = [
      (str(tmp_path / "folder"), "must end in .npz"),
      (str(tmp_path / "model"), f"must end in .npz (the checkpoint readers choose the format by "
                                f"the extension), e.g. --out {tmp_path / 'model'}.npz"),
      (str(tmp_path / "afile" / "x.npz"), "is a file, not a folder"),
      ("gs://bucket/model.npz", "gs:// paths need gcsfs"),
  ]
  (tmp_path / "dir.npz").mkdir()
  cases.append((str(tmp_path / "dir.npz"), "is a directory: give a file name"))
  for out, phrase in cases:
    result = _cli(["--workdir", workdir, "--out", out])
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and phrase in errors[0], (out, result.stderr)
    assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "model")
  result = _cli(["--workdir", "gs://bucket/run", "--out", str(tmp_path / "x.npz")])
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: gs://bucket/run" in result.stderr and "gcsfs" in result.stderr


@pytest.mark.skipif(not _mount_tmpfs("/tmp/idat_export_probe", "size=64k")
                    or subprocess.run(["umount", "/tmp/idat_export_probe"]).returncode != 0,
                    reason="needs permission to mount a small tmpfs")
def test_export_to_a_full_or_read_only_disk_keeps_the_earlier_file(idat_run, tmp_path):
  _, workdir, _ = idat_run
  full, ro = tmp_path / "full", tmp_path / "ro"
  assert _mount_tmpfs(full, "size=48k")
  try:
    earlier = full / "x.student.npz"
    earlier.write_bytes(b"an earlier export")
    result = _cli(["--workdir", workdir, "--out", str(full / "x.npz")])
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "No space left on device" in errors[0] and "free space and export again" in errors[0]
    assert earlier.read_bytes() == b"an earlier export"
    assert sorted(os.listdir(full)) == ["x.student.npz"]  # no temporary file left behind
  finally:
    subprocess.run(["umount", "-l", str(full)], capture_output=True)
  assert _mount_tmpfs(ro, "size=1m,ro")
  try:
    result = _cli(["--workdir", workdir, "--out", str(ro / "x.npz")])
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "Read-only file system" in errors[0] or "not writable" in errors[0]
  finally:
    subprocess.run(["umount", "-l", str(ro)], capture_output=True)
