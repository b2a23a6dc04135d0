"""LLaVA's data as the Tasks read it: the instruction files of a config (LLaVA's
JSON format, or the shapes' instruction data generated on first use), their
images, tokenizer and template, and the example transform that turns a
record into {image, tokens, labels}.
"""

from __future__ import annotations

import json
import os

import grain
import ml_collections
import numpy as np

from mmjax.data import instruct, transforms
from mmjax.data import tokenizer as tokenizer_lib


def resolve_data(data_cfg) -> ml_collections.ConfigDict:
  """An unlocked copy of `data` with the instruction files filled in.

  With `data.instruct` settings (the shapes scenes), the dataset is written
  once into `data.instruct_dir` (default: a cache folder named by the
  settings) and json_path / eval_json_path / image_folder / tokenizer point
  into it; explicit values win.
  """
  cfg = ml_collections.ConfigDict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict")
                                  else dict(data_cfg))
  settings = cfg.get("instruct")
  if settings:
    folder = instruct.prepare(cfg.get("instruct_dir"), **settings.to_dict())
    cfg.instruct_dir = folder
    cfg.image_folder = cfg.get("image_folder") or folder
    cfg.tokenizer = cfg.get("tokenizer") or os.path.join(folder, "tokenizer.model")
  return cfg


def json_path(cfg, key: str, default_name: str) -> str:
  """`data.KEY`, else `default_name` in the generated instruction folder."""
  value = cfg.get(key)
  if value:
    return value
  if cfg.get("instruct_dir"):
    return os.path.join(cfg.instruct_dir, default_name)
  raise ValueError(f"set data.{key} (a LLaVA JSON file) or data.instruct (the shapes settings)")


def optional_path(cfg, key: str, default_name: str) -> str | None:
  """`json_path` for a file the data may lack (older data folders): None if absent."""
  path = cfg.get(key) or (cfg.get("instruct_dir") and os.path.join(cfg.instruct_dir,
                                                                    default_name))
  return path if path and os.path.exists(path) else None


def load_tokenizer(cfg):
  """The tokenizer of `data.tokenizer`."""
  if not cfg.get("tokenizer"):
    raise ValueError("set data.tokenizer (a sentencepiece .model or tokenizer.json)")
  return tokenizer_lib.load_tokenizer(cfg.tokenizer)


def template(cfg) -> instruct.Template:
  """The conversation template of `data.template`, with `data.system_prompt`."""
  return instruct.get_template(cfg.template, cfg.get("system_prompt"))


def read_image(cfg, relpath: str) -> np.ndarray:
  """A record's image, by its path relative to `data.image_folder`."""
  with open(os.path.join(cfg.image_folder or "", relpath), "rb") as f:
    return transforms.decode(f.read())


class LlavaExample(grain.transforms.RandomMap):
  """A LLaVA record -> {image, tokens, labels}; None (skipped) without an image."""

  def __init__(self, tokenizer, template: instruct.Template, max_len: int, image_size: int,
               normalize: str = "clip", pad_square: bool = False):
    self.tokenizer, self.template, self.max_len = tokenizer, template, max_len
    self.image_size, self.normalize, self.pad_square = image_size, normalize, pad_square

  def random_map(self, item, rng):
    del rng
    _, example = item
    if example["bad"] or example["image"] is None:
      return None
    return self.make(example["image"], json.loads(example["conversations"]), example["id"])

  def make(self, image, conversations, sample_id="?") -> dict[str, np.ndarray]:
    tokens, labels = instruct.tokenize(conversations, self.tokenizer, self.template,
                                       max_len=self.max_len, sample_id=sample_id)
    return {"image": transforms.preprocess_image(image, self.image_size, self.normalize,
                                                 pad_square=self.pad_square),
            "tokens": instruct.pad_to(tokens, self.max_len, self.tokenizer.pad_id),
            "labels": instruct.pad_to(labels, self.max_len, instruct.IGNORE_INDEX)}
