"""What every model family's converter shares: activation names, size names,
preprocessing from a HF `preprocessor_config.json`, and the workdir config."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from mmjax.convert.mapping import ConversionError
from mmjax.data import transforms

# HF hidden_act -> ours. HF's "gelu" is the exact erf GELU; gelu_new,
# gelu_pytorch_tanh and gelu_fast are all the tanh approximation.
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# ours -> the HF name written on export.
TO_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                     "relu": "relu", "silu": "silu"}


def activation(name: str, field: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise ConversionError(f"{field}={name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[name]


def hf_activation(name: str, field: str) -> str:
  if name not in TO_HF_ACTIVATIONS:
    raise ConversionError(f"{field}={name!r} has no transformers equivalent")
  return TO_HF_ACTIVATIONS[name]


def require(cfg: dict, field: str, allowed, where: str) -> None:
  """Fails naming `where.field` when the HF config sets it to anything but `allowed`."""
  value = cfg.get(field, allowed[0] if isinstance(allowed, tuple) else allowed)
  options = allowed if isinstance(allowed, tuple) else (allowed,)
  if value not in options:
    raise ConversionError(f"{where}.{field}={value!r} is not supported (only {list(options)})")


def size_name(table: dict[str, tuple], dims: tuple) -> str | None:
  """The table's name for these dims, if it has one (test-only names excluded)."""
  for name, value in table.items():
    if name not in ("tiny",) and tuple(value) == tuple(dims):
      return name
  return None


# -- preprocessing -----------------------------------------------------------

def _edge(value, key: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, dict):
    if key in value:
      return int(value[key])
    if "height" in value and value.get("height") == value.get("width"):
      return int(value["height"])
    return None
  if isinstance(value, (list, tuple)):
    return int(value[0]) if len(set(value)) == 1 else None
  return int(value)


def preprocessing(src: str, image_size: int, *, pad_default: bool = False) -> dict[str, Any]:
  """data.transforms from `preprocessor_config.json` (when the folder has one).

  Our eval preprocessing resizes the shorter side to the image size (bicubic)
  and centre-crops it; a processor that does anything else fails, naming the
  field, rather than giving quietly different embeddings.
  """
  out = {"normalize": "clip", "pad_to_square": pad_default}
  path = os.path.join(src, "preprocessor_config.json")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    pre = json.load(f)
  where = "preprocessor_config"
  mean = np.asarray(pre.get("image_mean", transforms.CLIP_MEAN), np.float64)
  std = np.asarray(pre.get("image_std", transforms.CLIP_STD), np.float64)
  from mmjax.convert.hf_tokenizer import NORMALIZATION
  for mode, (m, sd) in NORMALIZATION.items():
    if np.allclose(mean, m, atol=1e-6) and np.allclose(std, sd, atol=1e-6):
      out["normalize"] = mode
      break
  else:
    raise ConversionError(f"{where}.image_mean/image_std = {mean.tolist()}/{std.tolist()} is "
                          f"not a supported normalisation: {NORMALIZATION}")
  if not pre.get("do_normalize", True) or not pre.get("do_rescale", True):
    raise ConversionError(f"{where}: do_normalize / do_rescale false is not supported")
  if pre.get("resample", 3) != 3:
    raise ConversionError(f"{where}.resample={pre['resample']} is not supported (3 = bicubic)")
  if pre.get("do_resize", True):
    shortest = _edge(pre.get("size"), "shortest_edge")
    if shortest != image_size:
      raise ConversionError(f"{where}.size={pre.get('size')!r}: only resizing the shorter side to "
                            f"the model's image size {image_size} is supported")
  if pre.get("do_center_crop", True):
    crop = _edge(pre.get("crop_size"), "height")
    if crop is not None and crop != image_size:
      raise ConversionError(f"{where}.crop_size={pre.get('crop_size')!r} differs from the "
                            f"model's image size {image_size}")
  if "do_pad" in pre:
    out["pad_to_square"] = bool(pre["do_pad"])
  return out


# -- the workdir config --------------------------------------------------------

def workdir_config(task: str, model: dict, data: dict, source: dict) -> ml_collections.ConfigDict:
  """The config.json of a converted workdir: what `mmjax.embed` / `mmjax.chat`
  need to rebuild the model (task, model.*, data.*), and where it came from.
  Fine-tuning uses an experiment config with the same model.* and
  init.clip_workdir (CLIP), init.lm_workdir / init.stage1_workdir (LLaVA)."""
  from mmjax.data.pipeline import default_data_config
  d = default_data_config("imported")
  for key, value in data.items():
    if isinstance(value, dict):
      d[key].update(value)
    else:
      d[key] = value
  return ml_collections.ConfigDict({
      "task": task, "seed": 0, "model": model, "data": d.to_dict(), "source": source,
      # Inference defaults (mmjax.chat builds this mesh): params sharded over
      # every device; no param is frozen.
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "rules": None, "optim": {"frozen": []}})
