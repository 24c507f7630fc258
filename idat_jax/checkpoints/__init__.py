"""Checkpoints: read official/timm/MAE ViT weights into our tree, merge, export, weight-copy.

Our parameter tree *is* the official Google ViT `.npz` layout (see ``idat_jax.models``), so:

* :func:`load_params` reads Google ``.npz`` and PyTorch timm/DeiT/MAE state dicts
  (``.safetensors``, ``.pth``) into that tree;
* :func:`merge_pretrained` / :func:`load_pretrained` put it into a freshly initialised model
  (new head, fresh PEFT weights, resized position embeddings) with a strict report;
* :func:`merge_lora` folds LoRA into its kernels; :func:`save_npz` / :func:`export_npz` write
  trees back as `.npz` files timm reads;
* :func:`copy_blocks` builds WeCoLoRA's weight-copied student;
* :func:`read_run_checkpoint` reads another run's Orbax checkpoint (e.g. a distilled student);
* :func:`resolve_pretrained` (also ``resolve_checkpoint``) turns a registered name, URL or
  ``hf-hub:`` name into a cached, verified local file (``pretrained.py``).

This layer works on plain nested dicts of arrays and files; it imports no model code
(``tests/test_layering.py`` checks the layer order). Slash-joined names come from
``idat_jax.tree_util``.
"""

from idat_jax.checkpoints.load import (FORMATS, LoadInfo, load_params, load_pretrained,
                                       read_checkpoint, tree_equal)
from idat_jax.checkpoints.merge import MergeReport, merge_lora, merge_pretrained, resize_posemb
from idat_jax.checkpoints.npz import export_npz, normalize_google_names, save_npz
from idat_jax.checkpoints.orbax_run import read_run_checkpoint
from idat_jax.checkpoints.pretrained import REGISTRY as PRETRAINED
from idat_jax.checkpoints.pretrained import DownloadError, NotCachedError, Pretrained
from idat_jax.checkpoints.pretrained import resolve as resolve_pretrained
from idat_jax.checkpoints.pretrained import resolve_checkpoint
from idat_jax.checkpoints.safetensors_io import read_safetensors
from idat_jax.checkpoints.torch_state import (HEADS_BY_WIDTH, convert_torch_state,
                                              infer_num_heads)
from idat_jax.checkpoints.weight_copy import copy_blocks, kept_blocks
from idat_jax.errors import CheckpointError

__all__ = [
    "FORMATS",
    "HEADS_BY_WIDTH",
    "CheckpointError",
    "LoadInfo",
    "DownloadError",
    "MergeReport",
    "NotCachedError",
    "PRETRAINED",
    "Pretrained",
    "convert_torch_state",
    "copy_blocks",
    "export_npz",
    "infer_num_heads",
    "kept_blocks",
    "load_params",
    "load_pretrained",
    "merge_lora",
    "merge_pretrained",
    "normalize_google_names",
    "read_checkpoint",
    "read_run_checkpoint",
    "read_safetensors",
    "resize_posemb",
    "resolve_checkpoint",
    "resolve_pretrained",
    "save_npz",
    "tree_equal",
]
