"""scripts/run_wecolora.sh -> scripts/wecolora_table.py (both tables of the seed README).

The sweep runs for real on tiny data: a random-weight ViT teacher saved as a Google-format .npz
(no download), digits as the ImageNet-layout folder, and a synthetic NIH-layout folder for the
ChestX-ray14 cell (mean AUROC); the tables are checked against what the runs wrote.
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import wecolora_table  # noqa: E402
from test_chestxray import _strict_json, write_nih  # noqa: E402  (JSON without NaN; NIH folder)

IMAGENET_CLASSES = range(5)  # digits 0-4 play ImageNet
# The teacher file's native image size is 32 (position table (1, 65, 64)); the runs use 16
# (1, 17, 64), as a WeCo+KD distillation at another image size than the file's does.
TEACHER = dict(width=64, depth=4, num_heads=2, mlp_dim=128, patch_size=4)
NATIVE_SIZE, RUN_SIZE = 32, 16
VARIANTS = ("weco_kd", "lora")  # table 2's comparison (and two rows of table 1)
DATASETS = ("imagenet", "chestxray")


def _write_imagenet(root: str, train_per_class: int = 40, val_per_class: int = 20) -> None:
  """An ImageNet-layout folder (``train/<class>/``, ``val/<class>/``) of digits."""
  from PIL import Image
  from idat_jax.data.digits import digits_uint8
  images, labels = digits_uint8()
  for c in IMAGENET_CLASSES:
    index = np.nonzero(labels == c)[0]
    for split, chosen in (("train", index[:train_per_class]),
                          ("val", index[train_per_class:train_per_class + val_per_class])):
      folder = os.path.join(root, split, f"n0{c}")
      os.makedirs(folder, exist_ok=True)
      for i in chosen:
        Image.fromarray(images[i], "L").save(os.path.join(folder, f"{i:04d}.png"))


def _write_chestxray(root: str) -> list[str]:
  """A small NIH-layout folder (test_chestxray.write_nih); the test split's findings."""
  rng = np.random.default_rng(3)
  names = ["No Finding", "Effusion", "Mass", "Hernia"]

  def draw(n):
    out = []
    for _ in range(n):
      first, extra = names[int(rng.integers(0, 4))], names[int(rng.integers(1, 4))]
      out.append(first if first in ("No Finding", extra) else f"{first}|{extra}")
    return out
  test = draw(40)
  write_nih(root, draw(48), test, size=24)
  return test


def _probe_summary(sweep: str, name: str, dataset: str) -> dict:
  """A probe's summary.json, read strictly (no NaN), checked against its results.csv row."""
  run = os.path.join(sweep, "probe", "ssl", name, dataset)
  summary = _strict_json(open(os.path.join(run, "summary.json"), encoding="utf-8").read())
  with open(os.path.join(run, "results.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1 and rows[0]["metric"] == summary["metric"]
  assert float(rows[0]["best"]) == pytest.approx(summary["best"], abs=1e-9)
  assert float(rows[0]["last"]) == pytest.approx(summary["last"], abs=1e-9)
  _strict_json(rows[0]["details"])
  summary["run"] = run
  return summary


def _cell(value: float, best: bool) -> str:
  return f"**{value:.1f}**" if best else f"{value:.1f}"


@pytest.mark.slow
def test_sweep_of_real_runs_to_both_tables(tmp_path):
  from idat_jax import checkpoints
  from idat_jax.data.chestxray import LABELS
  from idat_jax.models import build_vit
  from vit_testing import random_params
  teacher = str(tmp_path / "teacher.npz")
  checkpoints.save_npz(random_params(build_vit(None, 0, image_size=NATIVE_SIZE, **TEACHER)),
                       teacher)
  imagenet, cxr = str(tmp_path / "imagenet"), str(tmp_path / "cxr")
  _write_imagenet(imagenet)
  test_findings = _write_chestxray(cxr)
  sweep = str(tmp_path / "sweep")
  # Every run: the tiny teacher at 16 px, 2 epochs, one device. The tiny ImageNet folder has
  # 40 images per class, so the distillations keep all of them (few_shot_ratio 1; the run
  # names keep the sweep's alpha); LoRA rank 8 fits the width 64.
  flags = [f"--config.data.image_size={RUN_SIZE}", "--config.data.few_shot_ratio=1.0",
           f"--config.data.cache_dir={tmp_path / 'cache'}",
           f"--config.compilation_cache_dir={tmp_path / 'jax_cache'}",
           "--config.batch_size=40", "--config.eval_batch_size=100",
           "--config.optim.epochs=2", "--config.optim.warmup_epochs=1",
           "--config.optim.accum_steps=1", "--config.models.student.tuning.lora_rank=8",
           "--config.log_every_steps=100", "--config.tensorboard=False",
           "--config.models.teacher.variant=custom"]
  flags += [f"--config.models.teacher.{k}={v}" for k, v in TEACHER.items()]
  env = dict(os.environ, PYTHON=sys.executable, TEACHER_SSL=teacher, IMAGENET=imagenet,
             CXR=cxr, TABLES="2", REDUCTIONS="2", DATASETS=" ".join(DATASETS),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("TEACHER_SUP", None)
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_wecolora.sh"), sweep,
                         *flags], env=env, capture_output=True, text=True, cwd=ROOT,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
  # What ran: WeCo+KD and WeCoLoRA (SSL teacher, r=2, alpha 1%), each probed on both data
  # sets, and the copied student as the reference point.
  assert sorted(os.listdir(os.path.join(sweep, "distill", "ssl"))) == [
      "lora-r2-a0.01", "weco_kd-r2-a0.01"]
  names = [f"{v}-r2-a0.01" for v in VARIANTS] + ["copied-r2"]
  assert sorted(os.listdir(os.path.join(sweep, "probe", "ssl"))) == sorted(names)
  runs = {(n, d): _probe_summary(sweep, n, d) for n in names for d in DATASETS}
  # The WeCo+KD student trained its own position table at 16 px, which its probes loaded
  # although the teacher file's is (1, 65, 64).
  merged = np.load(os.path.join(sweep, "distill", "ssl", "weco_kd-r2-a0.01",
                                "student_merged.npz"))
  assert merged["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 64)
  for (name, dataset), s in runs.items():
    assert s["metric"] == ("mean_auroc" if dataset == "chestxray" else "top1")
    expected_run = "" if name.startswith("copied") else os.path.join(sweep, "distill", "ssl",
                                                                      name)
    assert s["backbone"] == ("copied" if name.startswith("copied") else "distilled")
    assert s["student_run"] == expected_run
  # The ChestX-ray14 probes keep each label's AUROC and how many labels the mean has; a label
  # with one class only in the test split is null.
  defined = [n for n in LABELS
             if 0 < sum(n in f.split("|") for f in test_findings) < len(test_findings)]
  for name in names:
    s = runs[name, "chestxray"]
    assert s["best_auroc_labels"] == s["last_auroc_labels"] == len(defined)
    assert s["last_auroc/Atelectasis"] is None
    assert np.mean([s[f"last_auroc/{n}"] for n in defined]) == pytest.approx(s["last"])

  out = str(tmp_path / "table")
  for metric in ("best", "last"):
    assert wecolora_table.main([sweep, "--out", f"{out}_{metric}", "--metric", metric]) == 0
    lines = open(f"{out}_{metric}.md", encoding="utf-8").read().splitlines()
    value = {(v, d): runs[f"{v}-r2-a0.01", d][metric] for v in VARIANTS for d in DATASETS}
    bold = {(v, d): value[v, d] == max(value[u, d] for u in VARIANTS)
            for v in VARIANTS for d in DATASETS}
    cells = {k: _cell(value[k], bold[k]) for k in value}
    # Table 2: the SSL teacher at r = 2, ImageNet top-1 and ChestX-ray14 mean AUROC, the
    # better of the two methods bold; the data sets that were not run are empty.
    assert (f"| ViT-B (SSL) | 2 | WeCo+KD | {cells['weco_kd', 'imagenet']} | "
            f"{cells['weco_kd', 'chestxray']} |  |  |  |") in lines
    assert (f"|  |  | WeCoLoRA | {cells['lora', 'imagenet']} | "
            f"{cells['lora', 'chestxray']} |  |  |  |") in lines
    assert "| ViT-B (supervised) | 2 | WeCo+KD |  |  |  |  |  |" in lines  # not run
    # Table 1 (alpha = 1%) shares those two distillations: their ImageNet column.
    assert f"|  | ✓ | ✗ | ✗ | {cells['weco_kd', 'imagenet']} |  |  |" in lines
    assert f"|  | ✓ | ✗ | ✓ | {cells['lora', 'imagenet']} |  |  |" in lines
    assert "| α=1% | ✗ | ✗ | ✗ |  |  |  |" in lines
    # The copied student: its own row, no comparison group.
    copied = {d: runs["copied-r2", d][metric] for d in DATASETS}
    assert (f"| ViT-B (SSL) | 2 | {copied['imagenet']:.1f} | {copied['chestxray']:.1f} "
            "|  |  |  |") in lines
    with open(f"{out}_{metric}.csv", newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
    for (name, dataset), s in runs.items():
      variant, alpha = name.split("-")[0], "" if name.startswith("copied") else "0.01"
      hit = [r for r in rows if (r["teacher"], r["variant"], r["r"], r["alpha"], r["dataset"])
             == ("ssl", variant, "2", alpha, dataset)]
      assert hit and all(r[metric] == f"{s[metric]:.4f}" and r["run"] == s["run"]
                         for r in hit)
    assert any(r[metric] == "" for r in rows)  # the cells of runs that never ran, empty


def test_run_names():
  assert wecolora_table.parse_run_name("lora_plain-r2-a0.1") == ("lora_plain", 2, "0.1")
  assert wecolora_table.parse_run_name("copied-r3") == ("copied", 3, "")
  assert wecolora_table.parse_run_name("notes") == (None, None, None)


def test_sweep_plans_both_tables_and_skips_finished_runs(tmp_path):
  out = str(tmp_path / "sweep")
  done = os.path.join(out, "probe", "ssl", "lora-r2-a0.01", "imagenet")
  os.makedirs(done)
  open(os.path.join(done, "results.csv"), "w").close()
  env = dict(os.environ, DRY_RUN="1", TEACHER_SSL="/t/mae.pth", TEACHER_SUP="/t/sup.npz",
             IMAGENET="/d/in", INAT19="/d/inat", RESISC45="/d/resisc", CXR="/d/cxr")
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_wecolora.sh"), out,
                         "--config.data.cache_dir=/c"], env=env, capture_output=True,
                        text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  runs = {l[4:] for l in lines if l.startswith("=== ")}
  distills = {r for r in runs if "/distill/" in r}
  # Table 1: 2 alphas x 4 variants (SSL, r=2); table 2: 2 teachers x 2 r x 2 methods at 1%,
  # of which SSL r=2 WeCo+KD / WeCoLoRA at 1% are shared with table 1.
  assert len(distills) == 8 + 8 - 2
  assert os.path.join(out, "distill", "sup", "lora-r3-a0.01") in distills
  assert f"skip {done} (finished)" in lines
  assert done not in runs
  probes = {r for r in runs if "/probe/" in r}
  assert os.path.join(out, "probe", "sup", "weco_kd-r3-a0.01", "chestxray") in probes
  assert os.path.join(out, "probe", "ssl", "copied-r3", "resisc45") in probes
  # The probe of a distilled student names its run; flags reach every command.
  cmd = next(l for l in lines if "probe/sup/lora-r3-a0.01/chestxray" in l and "idat_jax" in l)
  assert "student_run=" in cmd and "dataset=chestxray" in cmd and "root=/d/cxr" in cmd
  assert all("--config.data.cache_dir=/c" in l for l in lines if "idat_jax.main" in l)
  # Without a teacher, nothing of it runs.
  env.pop("TEACHER_SUP")
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_wecolora.sh"), out],
                        env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert "/sup/" not in proc.stdout.replace("skip teacher sup", "")
  # REDUCTIONS keeps the runs of those r only.
  env["REDUCTIONS"] = "3"
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_wecolora.sh"), out],
                        env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
  runs = [l for l in proc.stdout.splitlines() if l.startswith("=== ")]
  assert runs and all("-r3" in r for r in runs), proc.stdout
