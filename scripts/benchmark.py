"""Speed of idat-jax's hot paths against the hardware limit and a PyTorch baseline.

    python scripts/benchmark.py                      # CPU-sized (tiny models), about a minute
    python scripts/benchmark.py --preset h100 --out docs/benchmarks/h100.md   # real sizes

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
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idat_jax import config_lib
from idat_jax import sharding as shd
from idat_jax.data import vtab
from idat_jax.methods import build_method
from idat_jax.training import trainable as tr
from idat_jax.train import load_models, make_optimizer, make_update

TINY_S = dict(width=64, depth=4, num_heads=4, mlp_dim=256, patch_size=8)
TINY_T = dict(width=32, depth=4, num_heads=2, mlp_dim=128, patch_size=8)
PRESETS = {
    "cpu": dict(student=("custom", TINY_S), teacher=("custom", TINY_T), image_size=32,
                batches=(64, 256), weco_batch=64, rank=8, eval_batch=256, dtype="float32",
                warmup=2, steps=5, matmul=1024, torch_amp=False),
    "h100": dict(student=("B/16", {}), teacher=("S/16", {}), image_size=224,
                 batches=(64, 256), weco_batch=128, rank=128, eval_batch=512, dtype="bfloat16",
                 warmup=5, steps=20, matmul=8192, torch_amp=True),
}
VTAB_EPOCHS, VTAB_STEPS_PER_EPOCH, VTAB_BATCH = 110, 15, 64


def model_block(spec, mode, dtype, attention):
  variant, arch = spec
  m = config_lib.model_config(variant, "", mode)
  for k, v in arch.items():
    m[k] = v
  m.dtype = dtype
  m.attention_impl = attention
  return m


def idat_config(p, attention):
  c = config_lib.base_config()
  c.method = "idat"
  c.data.num_classes = 100
  c.data.image_size = p["image_size"]
  c.models.student = model_block(p["student"], "gist_seq_adapter", p["dtype"], attention)
  c.models.teacher = model_block(p["teacher"], "gist_seq_adapter", p["dtype"], attention)
  return c


def weco_config(p, attention):
  c = config_lib.base_config()
  c.method = "wecolora"
  c.data.image_size = p["image_size"]
  c.models.teacher = model_block(p["student"], "full", p["dtype"], attention)
  c.models.student = model_block(p["student"], "lora", p["dtype"], attention)
  c.models.student.tuning.lora_rank = p["rank"]
  c.wecolora.reduction = 2
  c.optim.update(dict(b2=0.95, weight_decay=0.05))
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


def compile_step(fn, *args, donate=True):
  jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", 0.0))
  return compiled, compile_s, flops


def train_step_bench(config, batch_size, p, mesh, rng):
  method = build_method(config)
  params, masks, _, extras = load_models(method, jax.random.key(0), mesh)
  trainable, frozen = tr.partition(params, masks)
  tx = make_optimizer(config.optim, optax.constant_schedule(1e-3), trainable)
  update = make_update(method, tx, optax.constant_schedule(1e-3))
  state = dict(trainable=trainable, opt=tx.init(trainable), step=jnp.zeros((), jnp.int32),
               extra=extras)
  size = p["image_size"]
  images = jax.device_put(rng.standard_normal((batch_size, size, size, 3), np.float32),
                          shd.batch_sharded(mesh))
  labels = jax.device_put(rng.integers(0, 100, batch_size).astype(np.int32),
                          shd.batch_sharded(mesh))
  batch = {"image": images, "label": labels}
  key = jax.random.key(1)
  compiled, compile_s, flops = compile_step(update, state, frozen, batch, key)
  step_s, (state, _) = timed(compiled, (state, frozen, batch, key), p["warmup"], p["steps"],
                             carry=True)
  params = tr.combine(state["trainable"], frozen)  # the initial arrays were donated
  return method, params, dict(step_ms=step_s * 1e3, images_per_s=batch_size / step_s,
                              compile_s=compile_s, flops=flops, tflops_per_s=flops / step_s / 1e12)


def forward_bench(fn, params, batch_size, p, mesh, rng):
  size = p["image_size"]
  images = jax.device_put(rng.standard_normal((batch_size, size, size, 3), np.float32),
                          shd.batch_sharded(mesh))
  compiled, compile_s, flops = compile_step(fn, params, images, donate=False)
  s, _ = timed(compiled, (params, images), p["warmup"], p["steps"])
  return dict(ms=s * 1e3, images_per_s=batch_size / s, compile_s=compile_s,
              tflops_per_s=flops / s / 1e12)


def peak_matmul(n, dtype):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  s, _ = timed(f, (a, a), 2, 5)
  return 2 * n ** 3 / s / 1e12


def peak_memory_gb():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def torch_bench(p, results):
  import importlib.util
  shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torchvision_shim")
  if importlib.util.find_spec("torchvision") is None and os.path.isdir(shim):
    sys.path.insert(0, shim)  # timm imports a few torchvision modules (see the shim's README)
  try:
    import torch
    from idat_jax.reference import torch_baseline as tb
  except ImportError as e:
    return {"skipped": f"torch/timm not importable: {e}"}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  amp = p["torch_amp"] and device == "cuda"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True

  def vit(spec, classes):
    variant, arch = spec
    from idat_jax.models import variant_kwargs
    a = dict(variant_kwargs(variant) if variant != "custom" else {}, **arch)
    return tb.timm_vit(a["width"], a["depth"], a["num_heads"], a["mlp_dim"], a["patch_size"],
                       p["image_size"], classes).to(device)

  out = {"device": device, "amp": amp, "torch": torch.__version__}
  size = p["image_size"]
  for b in p["batches"]:
    student = tb.add_gist_adapters(vit(p["student"], 100))
    teacher = tb.add_gist_adapters(vit(p["teacher"], 100))
    x = torch.randn(b, 3, size, size, device=device)
    y = torch.randint(0, 100, (b,), device=device)
    times = tb.time_steps(tb.idat_step_fn(student, teacher, amp), x, y, warmup=p["warmup"],
                          steps=p["steps"], device=device)
    s = statistics.median(times)
    out[f"idat_b{b}"] = dict(step_ms=s * 1e3, images_per_s=b / s)
  teacher = vit(p["student"], 0)
  student = tb.weco_student(teacher, 2, p["rank"]).to(device)
  b = p["weco_batch"]
  x = torch.randn(b, 3, size, size, device=device)
  times = tb.time_steps(tb.wecolora_step_fn(teacher, student, amp), x, None,
                        warmup=p["warmup"], steps=p["steps"], device=device)
  s = statistics.median(times)
  out[f"wecolora_b{b}"] = dict(step_ms=s * 1e3, images_per_s=b / s)
  return out


def vtab_estimate(step64_ms, eval_images_per_s):
  """Seconds for the 19-task protocol: train steps + per-epoch test evaluation."""
  train = VTAB_EPOCHS * VTAB_STEPS_PER_EPOCH * step64_ms / 1e3
  per_task = {}
  for name in vtab.VTAB_TASKS:
    test = vtab.get_task(name).test_size
    per_task[name] = train + VTAB_EPOCHS * test / eval_images_per_s
  return per_task


def run(preset: str, with_torch: bool, attention: str) -> dict:
  p = PRESETS[preset]
  mesh = shd.make_mesh()
  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  res = {"preset": preset, "date": datetime.date.today().isoformat(),
         "device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
         "host": f"{platform.machine()}, {os.cpu_count()} cpus",
         "versions": {"jax": jax.__version__, "python": platform.python_version()},
         "dtype": p["dtype"]}
  import flax
  res["versions"]["flax"] = flax.__version__
  res["peak_matmul_tflops"] = peak_matmul(
      p["matmul"], jnp.bfloat16 if dev.platform in ("gpu", "tpu") else jnp.float32)
  for b in p["batches"]:
    method, params, r = train_step_bench(idat_config(p, attention), b, p, mesh, rng)
    r["mfu"] = r["tflops_per_s"] / res["peak_matmul_tflops"]
    res[f"idat_b{b}"] = r
  predict = lambda prm, x: method.predict(prm, x, {})
  res["eval"] = forward_bench(predict, params, p["eval_batch"], p, mesh, rng)
  wmethod, wparams, r = train_step_bench(weco_config(p, attention), p["weco_batch"], p, mesh,
                                         rng)
  r["mfu"] = r["tflops_per_s"] / res["peak_matmul_tflops"]
  res[f"wecolora_b{p['weco_batch']}"] = r
  teacher_spec = wmethod._specs()["teacher"]
  feats = lambda prm, x: teacher_spec.module.apply({"params": prm["teacher"]}, x,
                                                   features=True)["pooled"]
  res["probe_features"] = forward_bench(feats, wparams, p["eval_batch"], p, mesh, rng)
  res["peak_memory_gb"] = peak_memory_gb()
  per_task = vtab_estimate(res["idat_b64"]["step_ms"], res["eval"]["images_per_s"])
  res["vtab_protocol_minutes"] = sum(per_task.values()) / 60
  res["vtab_per_task_s"] = per_task
  if with_torch:
    res["torch"] = torch_bench(p, res)
  return res


def to_markdown(res: dict) -> str:
  mem = res["peak_memory_gb"]
  mem = "n/a (the backend does not report it)" if mem is None else f"{mem:.2f} GiB"
  lines = [f"## idat-jax benchmark: preset `{res['preset']}`, {res['date']}",
           f"device: {res['device']}; host: {res['host']}; compute dtype {res['dtype']}; "
           f"versions: {json.dumps(res['versions'])}",
           f"peak matmul: {res['peak_matmul_tflops']:.3f} TFLOP/s; peak device memory: {mem}",
           "", "| step | ms | images/s | compile s | TFLOP/s | MFU | PyTorch images/s | ratio |",
           "|---|---|---|---|---|---|---|---|"]
  torch_res = res.get("torch", {})
  for key in [k for k in res if k.startswith(("idat_b", "wecolora_b"))]:
    r, t = res[key], torch_res.get(key)
    theirs = f"{t['images_per_s']:.0f}" if t else "-"
    ratio = f"{r['images_per_s'] / t['images_per_s']:.2f}x" if t else "-"
    lines.append(f"| {key} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | "
                 f"{r['compile_s']:.1f} | {r['tflops_per_s']:.3f} | {r['mfu']:.1%} | "
                 f"{theirs} | {ratio} |")
  for key in ("eval", "probe_features"):
    r = res[key]
    lines.append(f"| {key} (forward) | {r['ms']:.2f} | {r['images_per_s']:.0f} | "
                 f"{r['compile_s']:.1f} | {r['tflops_per_s']:.3f} | - | - | - |")
  lines += ["", f"Estimated iDAT VTAB-1K protocol (19 tasks x 110 epochs, per-epoch test "
                f"evaluation): {res['vtab_protocol_minutes']:.1f} min"]
  if "skipped" in torch_res:
    lines.append(f"PyTorch baseline skipped: {torch_res['skipped']}")
  elif torch_res:
    lines.append(f"PyTorch {torch_res['torch']} on {torch_res['device']}, AMP {torch_res['amp']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  parser.add_argument("--out", default="", help="append the Markdown report to this file "
                      "(and write the JSON next to it)")
  args = parser.parse_args(argv)
  res = run(args.preset, not args.no_torch, args.attention)
  md = to_markdown(res)
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(md + "\n\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
      json.dump(res, f, indent=2, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
