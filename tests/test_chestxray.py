"""ChestX-ray14 (NIH layout) and CSV multi-label readers, packed labels, and a multi-label
linear probe end to end through the CLI (issue 13, items 2 and 6)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idat_jax.data import loader
from idat_jax.data.base import DataError, DataNotPreparedError
from idat_jax.data.chestxray import LABELS, ChestXray14Source
from idat_jax.data.multilabel_csv import MultiLabelCsvSource, pack_labels, unpack_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_nih(root, findings_train, findings_test, *, size=24, extra_rows=(), unlisted=(),
              missing=(), seed=0):
  """A small NIH-layout directory: CSV + split lists + PNGs in images_00{1,2}/images/.

  ``findings_*``: list of 'A|B' strings; images are grey squares whose brightness depends on
  the first label (so a probe can learn something). ``missing``: listed names with no PNG;
  ``unlisted``: PNGs in neither list; ``extra_rows``: (name, findings) CSV rows only.
  """
  rng = np.random.default_rng(seed)
  rows, lists = [], {"train_val_list.txt": [], "test_list.txt": []}
  for split_file, findings in (("train_val_list.txt", findings_train),
                               ("test_list.txt", findings_test)):
    for f in findings:
      name = f"{len(rows):08d}_000.png"
      rows.append((name, f))
      lists[split_file].append(name)
  for name, f in extra_rows:
    rows.append((name, f))
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
    for i, (name, f) in enumerate(rows):
      w.writerow([name, f, 0, i])
  for split_file, names in lists.items():
    with open(os.path.join(root, split_file), "w") as fh:
      listed = list(names) + (list(missing) if split_file == "train_val_list.txt" else [])
      fh.write("\n".join(listed) + "\n")
  for i, (name, f) in enumerate(rows):
    if name in missing:
      continue
    folder = os.path.join(root, f"images_00{1 + i % 2}", "images")
    os.makedirs(folder, exist_ok=True)
    first = f.split("|")[0]
    level = 40 + 15 * (LABELS.index(first) if first in LABELS else 0)
    pixels = np.clip(rng.normal(level, 12, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "L").save(os.path.join(folder, name))
  for name in set(unlisted) - {name for name, _ in rows}:
    folder = os.path.join(root, "images_001", "images")
    Image.fromarray(np.zeros((size, size), np.uint8), "L").save(os.path.join(folder, name))
  return rows


def test_nih_reader_labels_splits_and_counted_skips(tmp_path):
  root = str(tmp_path / "cxr")
  train = ["Effusion|Mass", "No Finding", "Hernia", "Atelectasis|Cardiomegaly|Effusion"]
  test = ["No Finding", "Pneumonia"]
  write_nih(root, train, test, missing=["99999999_000.png"], unlisted=["88888888_000.png"],
            extra_rows=[("99999999_000.png", "Mass"), ("88888888_000.png", "Edema")])
  src = ChestXray14Source(root, "train")
  assert len(src) == 4 and src.num_classes == 15 and src.label_names == list(LABELS)
  assert src.skipped == {"missing_image": 1, "in_no_list": 1}
  hot = unpack_labels(src.labels(), 15)
  want = np.zeros((4, 15), np.float32)
  for i, f in enumerate(train):
    for name in f.split("|"):
      want[i, LABELS.index(name)] = 1
  np.testing.assert_array_equal(hot, want)
  # Images come back as RGB of the stored grey PNG, with the packed label.
  image, label = src.get(1)
  assert np.asarray(image).shape == (24, 24, 3) and label == 1 << LABELS.index("No Finding")
  test_src = loader.open_task_split("ignored", "test", backend="chestxray", data_dir=root)
  assert len(test_src) == 2
  assert unpack_labels(test_src.labels(), 15)[1, LABELS.index("Pneumonia")] == 1


def test_nih_reader_rejects_bad_rows(tmp_path):
  root = str(tmp_path / "unknown")
  write_nih(root, ["Effusion", "Pneumonitis"], ["Mass"])
  with pytest.raises(DataError, match=r"Data_Entry_2017_v2020\.csv.*unknown label.*Pneumonitis"):
    ChestXray14Source(root, "train")
  root = str(tmp_path / "norow")
  write_nih(root, ["Effusion"], ["Mass"])
  with open(os.path.join(root, "train_val_list.txt"), "a") as fh:
    fh.write("12345678_000.png\n")
  with pytest.raises(DataError, match="no row for image 12345678_000.png"):
    ChestXray14Source(root, "train")
  root = str(tmp_path / "overlap")
  write_nih(root, ["Effusion"], ["Mass"])
  with open(os.path.join(root, "test_list.txt"), "a") as fh:
    fh.write("00000000_000.png\n")
  with pytest.raises(DataError, match="in both"):
    ChestXray14Source(root, "test")
  root = str(tmp_path / "empty")
  write_nih(root, ["Effusion", ""], ["Mass"])
  with pytest.raises(DataError, match="empty 'Finding Labels'"):
    ChestXray14Source(root, "train")
  with pytest.raises(DataNotPreparedError, match="Data_Entry_2017"):
    ChestXray14Source(str(tmp_path), "train")
  with pytest.raises(DataError, match="split 'val' unknown"):
    ChestXray14Source(root, "val")
  with pytest.raises(DataError, match="few-shot"):
    loader.open_task_split("x", "train", backend="chestxray", data_dir=root, few_shot=0.1)


def test_pack_unpack_round_trip_and_limits():
  rng = np.random.default_rng(0)
  hot = (rng.random((50, 31)) < 0.3).astype(np.float32)
  packed = pack_labels(hot)
  assert packed.dtype == np.int32 and packed.min() >= 0
  np.testing.assert_array_equal(unpack_labels(packed, 31), hot)
  import jax.numpy as jnp
  np.testing.assert_array_equal(np.asarray(unpack_labels(jnp.asarray(packed), 31)), hot)
  with pytest.raises(DataError, match="at most 31"):
    pack_labels(np.zeros((1, 32)))
  with pytest.raises(DataError, match="0 or 1"):
    pack_labels(np.full((1, 3), 2))


def _write_csv_set(root, rows, header=("path", "any", "epidural", "subdural")):
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  with open(os.path.join(root, "train.csv"), "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(header)
    for row in rows:
      w.writerow(row)
  for row in rows:
    path = os.path.join(root, row[0])
    if "missing" not in path:
      Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(path)


def test_csv_reader_values_skips_and_errors(tmp_path):
  root = str(tmp_path / "rsna")
  _write_csv_set(root, [("img/a.png", 1, 0, 1), ("img/missing.png", 1, 1, 1),
                        ("img/b.png", 0, 0, 0)])
  src = loader.open_task_split("rsna", "train", backend="multilabel_csv", data_dir=root)
  assert len(src) == 2 and src.num_classes == 3 and src.label_names == ["any", "epidural",
                                                                         "subdural"]
  assert src.skipped == {"missing_image": 1}
  np.testing.assert_array_equal(unpack_labels(src.labels(), 3), [[1, 0, 1], [0, 0, 0]])
  bad = str(tmp_path / "bad")
  _write_csv_set(bad, [("img/a.png", 1, 0, 1), ("img/b.png", 1, 2, 0)])
  with pytest.raises(DataError, match=r"train\.csv:3: label values must be 0 or 1"):
    MultiLabelCsvSource(bad, "train")
  short = str(tmp_path / "short")
  _write_csv_set(short, [("img/a.png", 1, 0)])
  with pytest.raises(DataError, match=r"train\.csv:2: 3 columns, the header has 4"):
    MultiLabelCsvSource(short, "train")
  with pytest.raises(DataNotPreparedError, match="test.csv not found"):
    MultiLabelCsvSource(root, "test")
  wide = tmp_path / "wide"
  wide.mkdir()
  (wide / "train.csv").write_text("path," + ",".join(f"l{i}" for i in range(32)) + "\n")
  with pytest.raises(DataError, match=r"train\.csv: 32 label columns; at most 31"):
    MultiLabelCsvSource(str(wide), "train")


# ---------------------------------------------------------------------------------------------
# A 2-epoch multi-label probe through the CLI.

@pytest.mark.slow
@pytest.mark.parametrize("augment", [True, False])
def test_multilabel_probe_through_the_cli(tmp_path, augment):
  from idat_jax import checkpoints as ck
  from idat_jax.models import build_vit
  from vit_testing import random_params
  root = str(tmp_path / "cxr")
  rng = np.random.default_rng(1)
  names = ["No Finding", "Effusion", "Mass", "Hernia"]
  def draw(n):
    out = []
    for _ in range(n):
      first = names[int(rng.integers(0, 4))]
      extra = names[int(rng.integers(1, 4))]
      out.append(first if first == "No Finding" or extra == first else f"{first}|{extra}")
    return out
  test_findings = draw(40)
  write_nih(root, draw(48), test_findings, size=40)
  arch = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
  teacher = str(tmp_path / "teacher.npz")
  ck.save_npz(random_params(build_vit(None, 0, image_size=32, **arch), seed=0), teacher)
  workdir = str(tmp_path / "probe")
  overrides = [f"--config.data.root={root}", "--config.data.image_size=32",
               "--config.models.teacher.variant=custom", "--config.batch_size=16",
               "--config.eval_batch_size=16", "--config.num_devices=2",
               "--config.progress_bar=False", "--config.log_every_steps=1"]
  overrides += [f"--config.models.teacher.{k}={v}" for k, v in arch.items()]
  cmd = [sys.executable, "-m", "idat_jax.main", "--config",
         f"configs/wecolora_linprobe.py:dataset=chestxray,r=1,epochs=2,warmup=1,teacher={teacher},"
         f"augment={augment}", "--workdir", workdir, *overrides]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.csv"), newline="") as fh:
    rows = list(csv.DictReader(fh))
  assert len(rows) == 1
  row = dict(rows[0])
  row.update(json.loads(row.get("details") or "{}"))  # describe()'s fields beyond the columns
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [m for m in metrics if "mean_auroc" in m or "test_mean_auroc" in m]
  assert len(evals) == 2  # one evaluation per epoch
  last = evals[-1].get("mean_auroc", evals[-1].get("test_mean_auroc"))
  # Random-weight backbone on brightness-coded images: a real AUROC, not a constant 50.
  assert 0.0 <= last <= 100.0 and last != 50.0
  assert row.get("backbone") == "teacher"
  # The eval split went through the probe's CXR transform: its decode-cache entry says so.
  cache = os.path.join(str(tmp_path), "cache", "chestxray14", "cxr")
  assert any(name.startswith("test_cxr_32px") for name in os.listdir(cache)), os.listdir(cache)
  assert row.get("train_features") == ("streamed" if augment else "cached")
  # Per-label AUROCs and the number of labels in the mean are saved everywhere; a label with
  # one class only in the test split (11 of the 15 never occur) is JSON null, never NaN.
  positives = {name: sum(name in f.split("|") for f in test_findings) for name in LABELS}
  defined = [n for n in LABELS if 0 < positives[n] < len(test_findings)]
  summary = _strict_json(open(os.path.join(workdir, "summary.json")).read())
  details = _strict_json(rows[0]["details"])
  for record in (summary, details):
    assert record["last_auroc_labels"] == len(defined) and record["best_auroc_labels"]
    assert record["last_auroc/Atelectasis"] is None
    for name in defined:
      assert 0.0 <= record[f"last_auroc/{name}"] <= 100.0
    assert np.mean([record[f"last_auroc/{n}"] for n in defined]) == pytest.approx(
        summary["last"], abs=1e-9)
  assert summary["metric"] == "mean_auroc" and row["best"] and row["last"]
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    _strict_json(line)
  assert evals[-1]["test_auroc_labels"] == len(defined)
  assert evals[-1]["test_auroc/Hernia"] == summary["last_auroc/Hernia"]
  scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  assert scalars["test_auroc/Effusion"][-1] == pytest.approx(summary["last_auroc/Effusion"],
                                                             rel=1e-6)
  assert scalars["test_auroc_labels"][-1] == len(defined)
  assert "test_auroc/Atelectasis" not in scalars
  print(f"\n[cxr-cli] augment={augment}: mean AUROC {last:.2f} over {len(defined)} labels")


def _strict_json(text: str):
  """json.loads that refuses NaN/Infinity (not JSON, though Python writes them by default)."""
  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant} in {text[:200]!r}")
  return json.loads(text, parse_constant=refuse)


def _tensorboard_scalars(logdir: str) -> dict[str, list[float]]:
  """Tag -> values of every scalar in a TensorBoard log dir (TFRecord framing read here)."""
  import struct
  from tensorboardX.proto import event_pb2
  out: dict[str, list[float]] = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as fh:
      data = fh.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(value.simple_value)
  return out


def test_streamed_cxr_batches_are_the_reference_train_transform(tmp_path):
  """The probe's streamed train batches: CXR's flip + ColorJitter of each image, drawn anew
  every epoch from (seed, epoch, index); the eval split gets the deterministic transform."""
  from idat_jax import config_lib, sharding as shd
  from idat_jax.data import preprocess, probe_transforms as pt
  from idat_jax.methods import build_method
  root = str(tmp_path / "cxr")
  write_nih(root, ["Effusion", "Mass", "No Finding", "Hernia"] * 2, ["Mass", "Effusion"],
            size=40)
  c = config_lib.base_config()
  c.method = "linear_probe"
  c.seed = 3
  c.data.update(dict(backend="chestxray", root=root, train_split="train", eval_split="test",
                     image_size=32, normalization="chestxray"))
  c.probe.transform = "cxr"
  c.batch_size = 4
  method = build_method(c)
  train_data = method.build_train(shd.make_mesh(1), str(tmp_path / "run"))
  stream = train_data.stream
  source = ChestXray14Source(root, "train")
  for epoch in (0, 1):
    batch = stream.local_batch_arrays(epoch, 0)
    for row, index in enumerate(stream.local_indices(epoch, 0)):
      image, label = source.get(int(index))
      want = pt.cxr_train(image, 32, preprocess.augment_rng(3, epoch, int(index)))
      np.testing.assert_array_equal(batch["image"][row], want)
      assert batch["label"][row] == label
  a = stream.local_batch_arrays(0, 0)
  order = stream.local_indices(1, 0)
  same = [j for j, i in enumerate(stream.local_indices(0, 0)) if i in order]
  # Some image appears in step 0 of both epochs with different random draws, or the orders
  # differ; either way an epoch is not a copy of the previous one.
  assert not np.array_equal(a["image"], stream.local_batch_arrays(1, 0)["image"]) or not same
  eval_source = method.source("test")
  image, _ = eval_source.get(0)
  np.testing.assert_array_equal(image, pt.cxr_eval(ChestXray14Source(root, "test").get(0)[0], 32))
  assert method.label_names == list(LABELS)
