"""Which parameters train: ordered regex rules over slash-joined names, and the split they imply.

The rule semantics follow big_vision's ``optax.make``: each rule is ``(regex, value)``, the regex
is full-matched against the slash-joined parameter name (``Transformer/encoderblock_0/adapter/
down/kernel``), the first matching rule wins, and every parameter must be matched. Being strict
about coverage turns a misspelled rule into an error at start-up instead of a silently frozen (or
silently trained) module.

``partition`` splits a tree into a trainable and a frozen subtree that only hold their own
leaves, so a trainer can take ``jax.grad`` with respect to the trainable part alone: frozen weights
then get neither weight gradients nor optimizer state.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from idat_jax.tree_util import SEP, flatten, unflatten

PyTree = Any
Rules = Sequence[tuple[str, Any]]

_MAX_LISTED = 10


def _compile(rules: Rules) -> list[tuple[re.Pattern, Any]]:
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"rule {i} must be a (regex, value) pair, got {rule!r}")
    pattern, value = rule
    if pattern.startswith(SEP):
      raise ValueError(f"rule {i} regex {pattern!r}: parameter names never start with {SEP!r}")
    try:
      compiled.append((re.compile(pattern), value))
    except re.error as e:
      raise ValueError(f"rule {i} has an invalid regex {pattern!r}: {e}") from e
  return compiled


def match_rules(params: PyTree, rules: Rules) -> PyTree:
  """A tree like ``params`` holding, per leaf, the value of the first rule whose regex full-matches.

  Raises ValueError naming the parameters no rule covers; warns about rules that matched nothing
  (usually a typo or a rule shadowed by an earlier, broader one).
  """
  compiled = _compile(rules)
  flat = flatten(params)
  used = [False] * len(compiled)
  out, unmatched = {}, []
  for name in flat:
    for i, (pattern, value) in enumerate(compiled):
      if pattern.fullmatch(name):
        out[name] = value
        used[i] = True
        break
    else:
      unmatched.append(name)
  if unmatched:
    listed = ", ".join(unmatched[:_MAX_LISTED])
    more = f" (and {len(unmatched) - _MAX_LISTED} more)" if len(unmatched) > _MAX_LISTED else ""
    raise ValueError(
        f"{len(unmatched)} parameter(s) matched by no rule: {listed}{more}. "
        f"Rules (regex full-matched against slash-joined names, first match wins): "
        f"{[r[0] for r in rules]}")
  for i, ok in enumerate(used):
    if not ok:
      logging.warning("Parameter rule %d %r matched no parameter (typo, or shadowed by an "
                      "earlier rule?)", i, rules[i][0])
  return unflatten(out)


def trainable_mask(params: PyTree, rules: Rules) -> PyTree:
  """Bool tree from ``(regex, trainable)`` rules; see ``match_rules``."""
  for i, (pattern, value) in enumerate(rules):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"rule {i} ({pattern!r}) must map to a bool, got {value!r}")
  return match_rules(params, [(p, bool(v)) for p, v in rules])


def _check_same_names(params_flat: Mapping[str, Any], mask_flat: Mapping[str, Any]) -> None:
  if set(params_flat) != set(mask_flat):
    only_p = sorted(set(params_flat) - set(mask_flat))[:_MAX_LISTED]
    only_m = sorted(set(mask_flat) - set(params_flat))[:_MAX_LISTED]
    raise ValueError(f"mask does not match the parameter tree: only in params {only_p}, "
                     f"only in mask {only_m}")


def partition(params: PyTree, mask: PyTree) -> tuple[dict, dict]:
  """Splits ``params`` into ``(trainable, frozen)`` nested dicts holding only their own leaves."""
  flat, flat_mask = flatten(params), flatten(mask)
  _check_same_names(flat, flat_mask)
  trainable = {k: v for k, v in flat.items() if bool(flat_mask[k])}
  frozen = {k: v for k, v in flat.items() if not bool(flat_mask[k])}
  return unflatten(trainable), unflatten(frozen)


def combine(trainable: PyTree, frozen: PyTree) -> dict:
  """Inverse of ``partition``: merges two disjoint trees into one."""
  a, b = flatten(trainable), flatten(frozen)
  overlap = sorted(set(a) & set(b))
  if overlap:
    raise ValueError(f"{len(overlap)} parameter(s) are in both trees: {overlap[:_MAX_LISTED]}")
  return unflatten({**b, **a})


def count_params(tree: PyTree) -> int:
  """Exact number of scalars in a tree of arrays (or shape structs)."""
  return sum(int(math.prod(np.shape(x))) for x in flatten(tree).values())


_PEFT_RE = re.compile(r".*(adapter|lora|ssf|prompt).*", re.IGNORECASE)
_BLOCK_RE = re.compile(r"(encoderblock|block|layer)_?\d+")


def default_group(name: str) -> str:
  """Report group of a name: PEFT modules by name, encoder blocks aggregated, else top level."""
  parts = name.split(SEP)
  for part in parts:
    if _PEFT_RE.fullmatch(part):
      return re.sub(r"_?\d+$", "", part)
  if len(parts) > 2 and parts[0] == "Transformer":
    if _BLOCK_RE.fullmatch(parts[1]):
      return "Transformer/" + re.sub(r"\d+$", "*", parts[1])
    return "Transformer/" + parts[1]
  return parts[0]


def parameter_counts(params: PyTree, mask: PyTree,
                     groups: Rules | None = None) -> dict[str, tuple[int, int]]:
  """``{group: (trainable, total)}`` in first-seen order.

  ``groups`` optionally lists ``(regex, group_name)`` rules (first match wins) tried before the
  default grouping of ``default_group``.
  """
  flat, flat_mask = flatten(params), flatten(mask)
  _check_same_names(flat, flat_mask)
  compiled = _compile(groups or [])
  counts: dict[str, list[int]] = {}
  for name, leaf in flat.items():
    group = next((g for p, g in compiled if p.fullmatch(name)), None) or default_group(name)
    n = int(math.prod(np.shape(leaf)))
    c = counts.setdefault(group, [0, 0])
    c[0] += n if bool(flat_mask[name]) else 0
    c[1] += n
  return {g: (t, n) for g, (t, n) in counts.items()}


def parameter_report(params: PyTree, mask: PyTree, name: str,
                     groups: Rules | None = None) -> str:
  """Human-readable table of trainable/total parameter counts per module group, plus a total."""
  counts = parameter_counts(params, mask, groups)
  trainable = sum(t for t, _ in counts.values())
  total = sum(n for _, n in counts.values())
  width = max([len("group")] + [len(g) for g in counts])
  lines = [f"{name}: parameters",
           f"  {'group':<{width}}  {'trainable':>14}  {'total':>14}"]
  for g, (t, n) in counts.items():
    lines.append(f"  {g:<{width}}  {t:>14,d}  {n:>14,d}")
  pct = 100.0 * trainable / total if total else 0.0
  lines.append(f"{name}: trainable {trainable:,d} / total {total:,d} ({pct:.3f}%)")
  return "\n".join(lines)
