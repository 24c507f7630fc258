"""scripts/wecolora_table.py (both tables of the seed README) and scripts/run_wecolora.sh."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import wecolora_table  # noqa: E402

from idat_jax.training.metrics import append_result  # noqa: E402


def _probe(sweep, teacher, name, dataset, best, last, metric="top1"):
  append_result(os.path.join(sweep, "probe", teacher, name, dataset, "results.csv"),
                dict(task=dataset, method="linear_probe", seed=0, metric=metric,
                     best_top1=best, last_top1=last, trainable_params=1))


def test_tables_values_bold_and_empty_cells(tmp_path):
  sweep = str(tmp_path / "sweep")
  # Table 1, alpha = 1%: every variant on ImageNet; CIFAR-100 only for two of them.
  for i, v in enumerate(("no_copy", "weco_kd", "lora_plain", "lora")):
    _probe(sweep, "ssl", f"{v}-r2-a0.01", "imagenet", 10.0 + 9 * i, 9.0 + 9 * i)
  _probe(sweep, "ssl", "weco_kd-r2-a0.01", "cifar100", 32.1, 31.0)
  _probe(sweep, "ssl", "lora-r2-a0.01", "cifar100", 33.3, 33.0)
  # Table 2: supervised r=3 on ChestX-ray14 (mean AUROC) for both methods.
  _probe(sweep, "sup", "weco_kd-r3-a0.01", "chestxray", 57.2, 56.0, metric="mean_auroc")
  _probe(sweep, "sup", "lora-r3-a0.01", "chestxray", 67.6, 67.0, metric="mean_auroc")
  _probe(sweep, "sup", "copied-r2", "resisc45", 40.0, 39.0)
  out = str(tmp_path / "table")
  assert wecolora_table.main([sweep, "--out", out]) == 0
  md = open(out + ".md", encoding="utf-8").read()
  lines = md.splitlines()
  # Table 1: the enhanced-LoRA row at 1% is the best on ImageNet and CIFAR-100 (bold);
  # iNaturalist was never run: empty cells.
  row = next(l for l in lines if l.startswith("|  | ✓ | ✗ | ✓ |"))
  assert row == "|  | ✓ | ✗ | ✓ | **37.0** |  | **33.3** |"
  assert "| α=1% | ✗ | ✗ | ✗ | 10.0 |  |  |" in lines
  # alpha = 10% has no run at all: its four rows are empty.
  assert sum(1 for l in lines if l.endswith("|  |  |  |")) >= 4
  # Table 2: ChestX-ray14 of the supervised teacher at r=3, best bold.
  assert "|  | 3 | WeCo+KD |  | 57.2 |  |  |  |" in lines
  assert "|  |  | WeCoLoRA |  | **67.6** |  |  |  |" in lines
  assert "| ViT-B (supervised) | 2 | 40.0 |" not in md  # copied table has resisc45 4th
  assert "| ViT-B (supervised) | 2 |  |  |  | 40.0 |  |" in lines
  # --metric last reads the other column.
  wecolora_table.main([sweep, "--out", out + "_last", "--metric", "last"])
  assert "| α=1% | ✗ | ✗ | ✗ | 9.0 |  |  |" in open(out + "_last.md").read().splitlines()
  with open(out + ".csv", newline="") as f:
    cells = list(csv.DictReader(f))
  hit = [c for c in cells if (c["variant"], c["r"], c["dataset"]) == ("lora", "3", "chestxray")]
  assert hit[0]["best"] == "67.6000" and hit[0]["run"].endswith("lora-r3-a0.01/chestxray")
  assert any(c["best"] == "" for c in cells)  # missing runs are listed, empty
  assert os.path.getsize(out + ".png") > 1000


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
