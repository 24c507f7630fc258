"""The few readable lines a finished run prints (``summary.json`` keeps every detail).

* :func:`summary_lines`: what ran, best and last of its metric, trainable parameters, time;
* :func:`speed_lines`: a synthetic-data speed check's per-epoch train / eval / checkpoint
  seconds and their extrapolation to the run's full protocol (all its epochs, with the
  configured evaluation and checkpoint cadence);
* :func:`eval_lines`: ``mode=eval``'s result.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence


def duration(seconds: float) -> str:
  """``'42.0 s'``, ``'3.5 min'`` or ``'2.1 h'``: the unit a reader takes in at a glance."""
  if seconds < 120:
    return f"{seconds:.1f} s"
  if seconds < 120 * 60:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _what(summary: Mapping[str, Any]) -> str:
  """``'dtd, idat (gist_seq_adapter)'``: the task and the method with its variant."""
  variant = [str(summary[k]) for k in ("tuning", "student", "backbone") if summary.get(k)]
  method = str(summary.get("method", "?")) + (f" ({', '.join(variant)})" if variant else "")
  return f"{summary.get('task', '?')}, {method}"


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
  """A run's summary in three lines: result, trainable parameters, time and work dir."""
  metric = summary.get("metric") or "top1"
  best, last = summary.get("best"), summary.get("last")
  if best is None and last is None:
    result = "no test evaluation"
  else:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    epoch = summary.get("best_epoch")
    result = (f"{metric} best {fmt(best)}" + (f" (epoch {epoch})" if epoch is not None else "")
              + f", last {fmt(last)}")
  if summary.get("already_finished"):
    status = "already finished, nothing trained"
  elif summary.get("finished", True):
    status = "finished"
  else:
    status = (f"stopped early at step {summary.get('step')} (config.stop_after_steps; run the "
              "same command without it to continue)")
  lines = [f"{status}: {_what(summary)}: {result}"]
  trainable, total = summary.get("trainable_params"), summary.get("total_params")
  if trainable is not None:
    share = f" ({100 * trainable / total:.3g}%)" if total else ""
    lines.append(f"trainable parameters: {trainable:,} of {total or 0:,}{share}")
  wall = summary.get("wall_time_s")
  if wall is not None:
    setup = summary.get("setup_s")
    lines.append(f"time: {duration(float(wall))}"
                 + (f" (setup {duration(float(setup))})" if setup is not None else "")
                 + (f"; work dir {summary['workdir']}" if summary.get("workdir") else ""))
  return lines


def _cadence(epochs: int, every: int) -> set[int]:
  """The epochs (1-based) at which an every-``every``-epochs action runs; the last always."""
  if every <= 0:
    return set()
  return {e for e in range(1, epochs + 1) if e % every == 0 or e == epochs}


def _steady(values: Sequence[float]) -> float | None:
  """The typical cost after the first occurrence (which includes compilation)."""
  if not values:
    return None
  return statistics.mean(values[1:]) if len(values) > 1 else values[0]


def speed_lines(summary: Mapping[str, Any], eval_every_epochs: int,
                checkpoint_every_epochs: int = 1) -> list[str]:
  """The per-epoch times of ``summary['epoch_times']`` and the full protocol's estimate.

  The first epoch, first evaluation and first checkpoint are counted once as measured (they
  include compilation); every later one at the mean of the later measured ones (the first's
  when only one was measured, an upper bound).
  """
  rows = [tuple(r) for r in summary.get("epoch_times") or ()]
  epochs = int(summary.get("epochs") or 0)
  lines = ["speed check (synthetic images: the accuracies are chance)",
           f"  {'epoch':>5}  {'train s':>8}  {'eval s':>8}  {'checkpoint s':>12}"]
  if not rows or not epochs:
    return lines + ["  no complete epoch was measured"]
  evaluates = summary.get("best") is not None or summary.get("last") is not None
  eval_at = _cadence(epochs, eval_every_epochs) if evaluates else set()
  ckpt_at = _cadence(epochs, checkpoint_every_epochs)
  for epoch, train_s, eval_s, ckpt_s in rows:
    note = "   (includes compilation)" if epoch == rows[0][0] else ""
    shown_eval = f"{eval_s:8.2f}" if int(epoch) in eval_at else f"{'-':>8}"
    shown_ckpt = f"{ckpt_s:12.2f}" if int(epoch) in ckpt_at else f"{'-':>12}"
    lines.append(f"  {int(epoch):>5}  {train_s:8.2f}  {shown_eval}  {shown_ckpt}{note}")

  trains = [r[1] for r in rows]
  evals = [r[2] for r in rows if int(r[0]) in eval_at]
  ckpts = [r[3] for r in rows if int(r[0]) in ckpt_at]
  setup = float(summary.get("setup_s") or 0.0)
  first = trains[0]
  later = [f"{epochs - 1} x {_steady(trains):.2f} s train"] if epochs > 1 else []
  unmeasured = []
  for name, measured, count in (("eval", evals, len(eval_at)),
                                ("checkpoint", ckpts, len(ckpt_at))):
    if count and measured:
      first += measured[0]
      if count > 1:
        later.append(f"{count - 1} x {_steady(measured):.2f} s {name}")
    elif count:
      unmeasured.append(f"no {name} in the measured epochs (the first is at epoch "
                        f"{min(eval_at if name == 'eval' else ckpt_at)}): not counted")
  total = setup + first + sum(
      (n - 1) * _steady(m) for m, n in ((trains, epochs), (evals, len(eval_at)),
                                        (ckpts, len(ckpt_at))) if m and n > 1)
  evaluations = (f"{len(eval_at)} test evaluations (every {eval_every_epochs} epoch"
                 f"{'s' if eval_every_epochs > 1 else ''})" if eval_at else "no test evaluation")
  lines.append(f"  full protocol: {epochs} epochs, {evaluations}, {len(ckpt_at)} checkpoints: "
               f"about {duration(total)}")
  lines.append(f"    = setup {setup:.1f} s + first epoch/eval/checkpoint {first:.1f} s (compiling)"
               + (f" + {' + '.join(later)}" if later else ""))
  return lines + [f"    ({note})" for note in unmeasured]


def eval_lines(result: Mapping[str, Any]) -> list[str]:
  """``mode=eval``: the step evaluated, its metric, and what the run reported for it."""
  metric = result.get("metric") or "top1"
  value = result.get(metric)
  shown = "-" if value is None else f"{value:.2f}"
  reported = result.get("reported_last_top1")
  line = f"evaluated step {result.get('step')}: {metric} {shown}"
  if reported is not None:
    line += f" (the run reported {reported:.2f} at its last evaluation)"
  return [line]
