"""Speed of idat-jax's hot paths against the hardware limit and a PyTorch baseline.

    python scripts/benchmark.py                      # CPU-sized (tiny models), about a minute
    python scripts/benchmark.py --preset h100 --out docs/benchmarks/h100.md   # real sizes
    python scripts/benchmark.py --preset h100 --protocol-only --protocol dtd,kitti,...  # chunks

Measured after warm-up, each step synchronised, median over repeats: the iDAT train step
(student + teacher, gist_seq adapters) at two global batches, student evaluation throughput,
the WeCoLoRA distillation step (teacher -> r=2 LoRA student), linear-probe feature
extraction; compile time, XLA's FLOP count of each compiled step and the achieved FLOP/s, MFU
against a large matmul measured in the same run, peak device memory (where the backend reports
it); the same steps in PyTorch (timm + the same adapters/LoRA, AdamW, AMP on CUDA) when torch
is installed; and an estimate of the whole iDAT VTAB-1K protocol (19 tasks, 110 epochs of
15 steps at batch 64, the student evaluated on each test split every epoch).
Random weights and synthetic images: the arithmetic does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

# JAX preallocates 75% of a GPU by default; the PyTorch baseline shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax
import jax.numpy as jnp
import numpy as np

from idat_jax import train
from idat_jax import sharding as shd
from idat_jax.data import vtab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_S = dict(width=64, depth=4, num_heads=4, mlp_dim=256, patch_size=8)
TINY_T = dict(width=32, depth=4, num_heads=2, mlp_dim=128, patch_size=8)
PRESETS = {
    "cpu": dict(student=TINY_S, teacher=TINY_T, variants=("custom", "custom"), image_size=32,
                batches=(64, 256), weco_batch=64, rank=8, eval_batch=256, dtype="float32",
                warmup=2, steps=5, rounds=5, matmul=1024, torch_amp=False),
    "h100": dict(student={}, teacher={}, variants=("B/16", "S/16"), image_size=224,
                 batches=(64, 256), weco_batch=128, rank=128, eval_batch=512, dtype="bfloat16",
                 warmup=5, steps=20, rounds=3, matmul=8192, torch_amp=True),
}
VTAB_EPOCHS, VTAB_STEPS_PER_EPOCH, VTAB_BATCH = 110, 15, 64
BENCH_TASK = "cifar"  # 100 classes


def recipe(name: str, arg: str):
  """``get_config(arg)`` of ``configs/<name>.py``: the benchmark runs the recipes users run."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _sized(model, arch: dict, p, attention: str):
  if arch:  # the CPU preset's tiny models; the real presets keep the recipe's B/16 and S/16
    model.variant = "custom"
    for k, v in arch.items():
      model[k] = v
  model.dtype = p["dtype"]
  model.attention_impl = attention


def idat_config(p, batch: int, attention: str, task: str = BENCH_TASK, epochs: int = 1,
                eval_every: int = 1, ckpt_dir: str = "none"):
  """``configs/idat_vtab.py`` on synthetic data from random weights, sized by the preset."""
  c = recipe("idat_vtab", f"task={task},backend=synthetic,ckpt_dir={ckpt_dir},"
                          f"dtype={p['dtype']},eval_every={eval_every}")
  _sized(c.models.student, p["student"], p, attention)
  _sized(c.models.teacher, p["teacher"], p, attention)
  c.data.image_size = p["image_size"]
  c.batch_size = batch
  c.eval_batch_size = p["eval_batch"]
  c.optim.update(dict(epochs=epochs, cooldown_epochs=0, warmup_epochs=0))
  c.progress_bar = False
  return c


def weco_config(p, attention: str):
  """``configs/wecolora_distill.py`` (r=2) from a random teacher; one update per step (the
  recipe accumulates 8 micro-batches, which the PyTorch baseline does not)."""
  c = recipe("wecolora_distill", f"r=2,rank={p['rank']},teacher=")
  _sized(c.models.teacher, p["student"], p, attention)
  _sized(c.models.student, p["student"], p, attention)
  c.data.update(dict(backend="synthetic", task=BENCH_TASK, train_split="train800val200",
                     image_size=p["image_size"], augment=False))
  c.batch_size = p["weco_batch"]
  c.optim.accum_steps = 1
  c.progress_bar = False
  return c


def sync(x):
  jax.block_until_ready(x)
  return x


def timed(fn, args, warmup, steps, carry=False):
  """(median seconds per call, last output); with ``carry`` the first output replaces the
  first argument of the next call, as a train loop does with its donated state."""
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    out = sync(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    if carry:
      args = (out[0],) + tuple(args[1:])
  return statistics.median(times), out


def train_step_bench(config, workdir: str, p):
  """The trainer's own jitted step (batch gathered on device from the resident synthetic set,
  normalised, loss, gradients of the trainable tree, AdamW), timed as the loop runs it.

  Returns the setup, the measurement and ``runner``: one more synchronised step (seconds), for
  the rounds interleaved with the PyTorch baseline.
  """
  s = train.setup(config, workdir)
  step = train.make_train_step(s)
  data = s.train_data.resident
  t0 = time.perf_counter()
  compiled = step.lower(s.state, s.frozen, data).compile()
  compile_s = time.perf_counter() - t0
  secs, (state, _) = timed(compiled, (s.state, s.frozen, data), p["warmup"], p["steps"],
                           carry=True)
  s.state = state  # the initial arrays were donated

  def runner() -> float:
    t = time.perf_counter()
    s.state = sync(compiled(s.state, s.frozen, data)[0])
    return time.perf_counter() - t

  b = config.batch_size
  flops = flop_count(compiled)
  return s, dict(step_ms=secs * 1e3, images_per_s=b / secs, compile_s=compile_s, flops=flops,
                 tflops_per_s=flops / secs / 1e12), runner


def flop_count(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def forward_bench(fn, args, batch_size, p):
  """A jitted forward over ``args`` (the last being the batch): images/s and FLOP/s."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  secs, _ = timed(compiled, args, p["warmup"], p["steps"])
  return dict(ms=secs * 1e3, images_per_s=batch_size / secs, compile_s=compile_s,
              tflops_per_s=flop_count(compiled) / secs / 1e12)


def synthetic_batch(batch_size, p, mesh, rng, with_mask=False):
  size = p["image_size"]
  batch = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, 100, batch_size).astype(np.int32)}
  if with_mask:
    batch["mask"] = np.ones(batch_size, bool)
  return jax.device_put(batch, shd.batch_sharded(mesh))


def peak_matmul(n, dtype):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  s, _ = timed(f, (a, a), 2, 5)
  return 2 * n ** 3 / s / 1e12


def peak_memory_gb():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def torch_runners(p) -> dict:
  """PyTorch steps keyed like ours: ``{key: (runner, batch)}`` plus ``meta``; a runner does one
  synchronised step and returns its seconds."""
  tests = os.path.join(REPO, "tests")
  shim = os.path.join(tests, "torchvision_shim")
  if importlib.util.find_spec("torchvision") is None and os.path.isdir(shim):
    sys.path.insert(0, shim)  # timm imports a few torchvision modules (see the shim's README)
  sys.path.insert(0, tests)  # the PyTorch re-expression of the reference steps
  try:
    import torch
    import torch_reference as tb
  except ImportError as e:
    return {"meta": {"skipped": f"torch/timm not importable: {e}"}}
  from idat_jax.models import variant_kwargs
  device = "cuda" if torch.cuda.is_available() else "cpu"
  amp = p["torch_amp"] and device == "cuda"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True

  def vit(which, classes):
    variant, arch = p["variants"][which], (p["student"], p["teacher"])[which]
    a = dict(variant_kwargs(variant) if variant != "custom" else {}, **arch)
    return tb.timm_vit(width=a["width"], depth=a["depth"], num_heads=a["num_heads"],
                       mlp_dim=a["mlp_dim"], patch_size=a["patch_size"],
                       image_size=p["image_size"], num_classes=classes).to(device)

  def runner(step, x, y):
    tb.time_steps(step, x, y, warmup=p["warmup"], steps=0, device=device)
    return lambda: tb.time_steps(step, x, y, warmup=0, steps=1, device=device)[0]

  out = {"meta": {"device": device, "amp": amp, "torch": torch.__version__}}
  size = p["image_size"]
  for b in p["batches"]:
    student = tb.add_gist_adapters(vit(0, 100))
    teacher = tb.add_gist_adapters(vit(1, 100))
    x = torch.randn(b, 3, size, size, device=device)
    y = torch.randint(0, 100, (b,), device=device)
    out[f"idat_b{b}"] = (runner(tb.idat_step_fn(student, teacher, amp, device), x, y), b)
  teacher = vit(0, 0)
  student = tb.weco_student(teacher, 2, p["rank"]).to(device)
  b = p["weco_batch"]
  x = torch.randn(b, 3, size, size, device=device)
  out[f"wecolora_b{b}"] = (runner(tb.wecolora_step_fn(teacher, student, amp, device), x, None),
                           b)
  return out


def paired_rounds(ours, theirs, rounds: int, steps: int) -> dict:
  """Alternating rounds of ``steps`` steps of each side; medians per round, then over rounds.

  A shared machine's load drifts: timing both sides in the same rounds and taking the median
  of the per-round ratios keeps the comparison fair where a single pass each is not.
  """
  ours_s, theirs_s, ratios = [], [], []
  for _ in range(rounds):
    a = statistics.median(ours() for _ in range(steps))
    b = statistics.median(theirs() for _ in range(steps))
    ours_s.append(a)
    theirs_s.append(b)
    ratios.append(b / a)
  return dict(ours_s=statistics.median(ours_s), theirs_s=statistics.median(theirs_s),
              ratio=statistics.median(ratios), ratio_range=(min(ratios), max(ratios)))


def vtab_estimate(step64_ms, eval_images_per_s):
  """Seconds per task of the 19-task protocol from the step and eval throughput alone
  (train steps + per-epoch test evaluation; no setup, compile or checkpoint time)."""
  train_s = VTAB_EPOCHS * VTAB_STEPS_PER_EPOCH * step64_ms / 1e3
  return {name: train_s + VTAB_EPOCHS * vtab.get_task(name).test_size / eval_images_per_s
          for name in vtab.VTAB_TASKS}


def evaluations(epochs: int, every: int) -> int:
  """How many test evaluations a run makes (every ``every`` epochs, and the last)."""
  return len({e for e in range(1, epochs + 1) if e % every == 0 or e == epochs})


def random_checkpoints(p, root: str) -> str:
  """Random-weight ``.npz`` backbones (1000-class heads) under the recipe's file names, so the
  protocol runs load checkpoints as a real run does."""
  from idat_jax import checkpoints as ckpt_io
  from idat_jax.models import build_vit, init_params
  names = (recipe("idat_vtab", "").models.student.checkpoint,
           recipe("idat_vtab", "").models.teacher.checkpoint)
  for which, name in enumerate(names):
    variant, arch = p["variants"][which], (p["student"], p["teacher"])[which]
    model = build_vit(variant, 1000, image_size=p["image_size"], **arch)
    params = jax.jit(lambda key, m=model: init_params(m, key))(jax.random.key(which))
    ckpt_io.save_npz(jax.device_get(params), os.path.join(root, os.path.basename(name)))
  return root


def protocol_bench(p, tasks, attention: str, root: str) -> dict:
  """Each task's real run (``train_and_evaluate`` on synthetic data of the task's true train
  and test sizes, backbones loaded from ``.npz``) for two epochs with a test evaluation each; the 110-epoch time is
  extrapolated from the second (steady) epoch, keeping the first epoch's compile and data
  loading, and summed over tasks."""
  out = {}
  ckpt_dir = random_checkpoints(p, root)
  for task in tasks:
    config = idat_config(p, VTAB_BATCH, attention, task=task, epochs=2, eval_every=1,
                         ckpt_dir=ckpt_dir)
    workdir = os.path.join(root, task)
    config.data.cache_dir = os.path.join(root, "cache", task)
    summary = train.train_and_evaluate(config, workdir)
    (_, tr1, ev1, ck1), (_, tr2, ev2, ck2) = summary["epoch_times"]
    r = dict(test_size=vtab.get_task(task).test_size, setup_s=summary["setup_s"],
             first_train_s=tr1, first_eval_s=ev1, train_s=tr2, eval_s=ev2, checkpoint_s=ck2)
    for every in (1, 10):
      r[f"estimate_s_every{every}"] = (
          r["setup_s"] + tr1 + ck1 + (VTAB_EPOCHS - 1) * (tr2 + ck2)
          + ev1 + (evaluations(VTAB_EPOCHS, every) - 1) * ev2)
    out[task] = r
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(config.data.cache_dir, ignore_errors=True)  # 224 px test sets are large
    print(f"protocol {task}: {json.dumps({k: round(v, 2) for k, v in r.items()})}", flush=True)
  return out


def write_jpeg_folder(root: str, count: int, rng, classes: int = 8) -> None:
  """ImageNet-like JPEGs (500 x 375, smooth content plus noise) in <root>/<class>/."""
  from PIL import Image
  for i in range(count):
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
    noisy = np.asarray(image, np.int16) + rng.integers(-12, 13, (375, 500, 3))
    folder = os.path.join(root, f"class{i % classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def streaming_bench(p, mesh, rng, root: str) -> dict:
  """WeCoLoRA's host input: JPEG decode + RandomResizedCrop + flip, threaded, to the device."""
  from idat_jax.data import ImageFolderSource, StreamingTrainIterator
  b = p["weco_batch"]
  write_jpeg_folder(root, 4 * b, rng)
  it = StreamingTrainIterator(ImageFolderSource(root), p["image_size"], b, mesh, seed=0,
                              augment=True)
  sync(next(iter(it.epoch(0))))  # starts the pool
  t0 = time.perf_counter()
  n = 0
  for batch in it.epoch(1):
    sync(batch)
    n += b
  secs = time.perf_counter() - t0
  return dict(images_per_s=n / secs, workers=it.num_workers)


def run(preset: str, with_torch: bool, attention: str, protocol_tasks=(),
        steps: bool = True) -> dict:
  p = PRESETS[preset]
  mesh = shd.make_mesh()
  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  import flax
  res = {"preset": preset, "date": datetime.date.today().isoformat(),
         "device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
         "host": f"{platform.machine()}, {os.cpu_count()} cpus",
         "versions": {"jax": jax.__version__, "flax": flax.__version__,
                      "python": platform.python_version()},
         "dtype": p["dtype"]}
  res["peak_matmul_tflops"] = peak_matmul(
      p["matmul"], jnp.bfloat16 if dev.platform in ("gpu", "tpu") else jnp.float32)
  with tempfile.TemporaryDirectory() as tmp:
    if steps:
      runners = step_benchmarks(res, p, attention, mesh, rng, tmp)
      if with_torch:
        compare_with_torch(res, p, runners)
      if "step_ms" in res["idat_b64"] and "eval" in res:
        per_task = vtab_estimate(res["idat_b64"]["step_ms"], res["eval"]["images_per_s"])
        res["vtab_protocol_minutes"] = sum(per_task.values()) / 60
    if protocol_tasks:
      res["protocol"] = protocol_bench(p, protocol_tasks, attention, os.path.join(tmp, "vtab"))
  res["peak_memory_gb"] = peak_memory_gb()
  return res


def compare_with_torch(res: dict, p, runners: dict) -> None:
  """Our steps and PyTorch's in interleaved rounds (see :func:`paired_rounds`)."""
  theirs = torch_runners(p)
  res["torch"] = theirs.pop("meta")
  for key, (torch_runner, batch) in theirs.items():
    if key not in runners:
      continue
    pr = paired_rounds(runners[key], torch_runner, p["rounds"], p["steps"])
    r = res[key]
    r.update(step_ms=pr["ours_s"] * 1e3, images_per_s=batch / pr["ours_s"],
             tflops_per_s=r["flops"] / pr["ours_s"] / 1e12, ratio=pr["ratio"],
             ratio_range=pr["ratio_range"])
    r["mfu"] = r["tflops_per_s"] / res["peak_matmul_tflops"]
    res["torch"][key] = dict(step_ms=pr["theirs_s"] * 1e3, images_per_s=batch / pr["theirs_s"])


def step_benchmarks(res: dict, p, attention: str, mesh, rng, tmp: str) -> dict:
  """Fills ``res`` with our steps' measurements; returns their runners by key."""
  dev = jax.devices()[0]
  runners = {}
  attentions = [attention] + (["cudnn"] if dev.platform == "gpu" and attention != "cudnn"
                              else [])
  for b in p["batches"]:
    for impl in attentions:
      key = f"idat_b{b}" + ("" if impl == attention else f"_{impl}")
      try:
        s, r, runners[key] = train_step_bench(idat_config(p, b, impl), os.path.join(tmp, key),
                                              p)
      except Exception as e:  # e.g. cuDNN attention unsupported here: report, go on
        res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        continue
      r["mfu"] = r["tflops_per_s"] / res["peak_matmul_tflops"]
      res[key] = r
      if key == f"idat_b{p['batches'][0]}":
        eval_step = train.make_eval_step(s)
        batch = synthetic_batch(p["eval_batch"], p, mesh, rng, with_mask=True)
        res["eval"] = forward_bench(eval_step, (s.state["trainable"], s.frozen,
                                                s.state["extra"], batch), p["eval_batch"], p)
  key = f"wecolora_b{p['weco_batch']}"
  s, r, runners[key] = train_step_bench(weco_config(p, attention), os.path.join(tmp, "weco"), p)
  r["mfu"] = r["tflops_per_s"] / res["peak_matmul_tflops"]
  res[key] = r
  teacher = s.method.specs["teacher"].module
  feats = lambda prm, x: teacher.apply({"params": prm}, x, features=True)["pooled"]
  x = jnp.asarray(synthetic_batch(p["eval_batch"], p, mesh, rng)["image"], p["dtype"])
  res["probe_features"] = forward_bench(feats, (s.frozen["teacher"], x), p["eval_batch"], p)
  res["streamed_input"] = streaming_bench(p, mesh, rng, os.path.join(tmp, "jpegs"))
  return runners


def to_markdown(res: dict) -> str:
  mem = res["peak_memory_gb"]
  mem = "n/a (the backend does not report it)" if mem is None else f"{mem:.2f} GiB"
  lines = [f"## idat-jax benchmark: preset `{res['preset']}`, {res['date']}",
           f"device: {res['device']}; host: {res['host']}; compute dtype {res['dtype']}; "
           f"versions: {json.dumps(res['versions'])}",
           f"peak matmul: {res['peak_matmul_tflops']:.3f} TFLOP/s; peak device memory: {mem}"]
  if "streamed_input" in res:
    lines += step_table(res)
  if "protocol" in res:
    lines += protocol_table(res["protocol"])
  torch_res = res.get("torch", {})
  if "ratio_range" in res.get("idat_b64", {}):
    lines.append(f"Ratios: median over {PRESETS[res['preset']]['rounds']} interleaved rounds "
                 "(ours, then PyTorch, each the median of its steps); range in brackets.")
  if "skipped" in torch_res:
    lines.append(f"PyTorch baseline skipped: {torch_res['skipped']}")
  elif torch_res:
    lines.append(f"PyTorch {torch_res['torch']} on {torch_res['device']}, AMP {torch_res['amp']}"
                 f" (the reference's step: two GradScalers, two backward passes)")
  return "\n".join(lines)


def step_table(res: dict) -> list[str]:
  lines = ["", "| step | ms | images/s | compile s | TFLOP/s | MFU | PyTorch images/s | ratio |",
           "|---|---|---|---|---|---|---|---|"]
  torch_res = res.get("torch", {})
  for key in [k for k in res if k.startswith(("idat_b", "wecolora_b"))]:
    r, t = res[key], torch_res.get(key.replace("_cudnn", ""))
    if "error" in r:
      lines.append(f"| {key} | failed: {r['error']} | | | | | | |")
      continue
    theirs = f"{t['images_per_s']:.0f}" if t else "-"
    ratio = "-"
    if "ratio" in r:
      lo, hi = r["ratio_range"]
      ratio = f"{r['ratio']:.2f}x ({lo:.2f}-{hi:.2f})"
    elif t:
      ratio = f"{r['images_per_s'] / t['images_per_s']:.2f}x"
    lines.append(f"| {key} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | "
                 f"{r['compile_s']:.1f} | {r['tflops_per_s']:.3f} | {r['mfu']:.1%} | "
                 f"{theirs} | {ratio} |")
  for key in [k for k in ("eval", "probe_features") if k in res]:
    r = res[key]
    lines.append(f"| {key} (forward) | {r['ms']:.2f} | {r['images_per_s']:.0f} | "
                 f"{r['compile_s']:.1f} | {r['tflops_per_s']:.3f} | - | - | - |")
  st = res["streamed_input"]
  lines += ["", f"Streamed WeCoLoRA input (JPEG 500x375 decode + RandomResizedCrop + flip on "
                f"the host, {st['workers']} threads): {st['images_per_s']:.0f} images/s"]
  if "vtab_protocol_minutes" in res:
    lines.append(f"iDAT VTAB-1K protocol from step and eval throughput alone (per-epoch "
                 f"evaluation, no setup/compile/checkpoint): {res['vtab_protocol_minutes']:.1f} "
                 "min")
  return lines


def protocol_table(protocol: dict) -> list[str]:
  lines = ["", "Measured per task (two epochs of the real run on synthetic data of the task's "
               "sizes, extrapolated to 110 epochs):", "",
           "| task | test | setup s | epoch 1 train / eval s | train s/epoch | eval s | ckpt s "
           "| min, eval every epoch | min, every 10 |", "|---|---|---|---|---|---|---|---|---|"]
  for task, r in protocol.items():
    lines.append(f"| {task} | {r['test_size']} | {r['setup_s']:.1f} | {r['first_train_s']:.1f}"
                 f" / {r['first_eval_s']:.1f} | {r['train_s']:.2f} | {r['eval_s']:.2f} | "
                 f"{r['checkpoint_s']:.2f} | {r['estimate_s_every1'] / 60:.1f} | "
                 f"{r['estimate_s_every10'] / 60:.1f} |")
  every1 = sum(r["estimate_s_every1"] for r in protocol.values()) / 60
  every10 = sum(r["estimate_s_every10"] for r in protocol.values()) / 60
  lines.append(f"| **sum ({len(protocol)} tasks)** | | | | | | | **{every1:.1f}** | "
               f"**{every10:.1f}** |")
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  parser.add_argument("--protocol", default="", help="measure the iDAT VTAB-1K protocol on "
                      "synthetic data: 'all' (19 tasks) or comma-separated task names")
  parser.add_argument("--protocol-only", action="store_true",
                      help="skip the step benchmarks (to measure the protocol in chunks)")
  parser.add_argument("--out", default="", help="append the Markdown report to this file "
                      "(and write the JSON next to it)")
  args = parser.parse_args(argv)
  tasks = vtab.VTAB_TASKS if args.protocol == "all" else tuple(
      t for t in args.protocol.split(",") if t)
  for t in tasks:
    vtab.get_task(t)  # an unknown name fails here, not after the step benchmarks
  if args.protocol_only and not tasks:
    parser.error("--protocol-only needs --protocol")
  res = run(args.preset, not args.no_torch, args.attention, tasks, steps=not args.protocol_only)
  md = to_markdown(res)
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(md + "\n\n")
    runs_path = os.path.splitext(args.out)[0] + ".json"
    runs = []
    if os.path.exists(runs_path):
      with open(runs_path, encoding="utf-8") as f:
        runs = json.load(f)
      runs = runs if isinstance(runs, list) else [runs]
    with open(runs_path, "w", encoding="utf-8") as f:
      json.dump(runs + [res], f, indent=2, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
