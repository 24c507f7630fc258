"""A strict `.safetensors` reader into NumPy (bfloat16 / float8 via ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` and one byte buffer. Reading it directly (instead of
``safetensors.numpy``) keeps bfloat16 tensors, which NumPy alone cannot name, and lets every
structural problem (truncation, overlapping tensors, bad header) be reported with the file name.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from idat_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as NumPy arrays (copies, file closed afterwards)."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, truncated?)")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):
      raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n} "
                            f"but the file has {size} bytes)")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  buffer_size = size - 8 - n
  spans = []
  for name, entry in header.items():
    try:
      dtype = _DTYPES[entry["dtype"]]
      shape = tuple(int(s) for s in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: corrupt or unsupported safetensors entry {name!r}: "
                            f"{entry!r}") from None
    if end > buffer_size:
      raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data "
                            f"buffer but only {buffer_size} bytes are present")
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
      raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not "
                            f"match its shape {shape} and dtype {entry['dtype']}")
    spans.append((begin, end, name, dtype, shape))
  spans.sort()
  for (_, e0, a, *_), (b1, _, b, *_) in zip(spans, spans[1:]):
    if b1 < e0:
      raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data buffer")
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(buffer_size,)) \
      if buffer_size else np.zeros((0,), np.uint8)
  out = {}
  for begin, end, name, dtype, shape in spans:
    out[name] = np.array(data[begin:end].view(dtype).reshape(shape))
  del data
  return {name: out[name] for name in header}
