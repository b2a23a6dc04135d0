"""Random-access sources that yield one example dict per index, for grain.

Every source returns the same example layout:
  image        uint8 [H, W, 3], or None (a text-only record, or an unreadable file)
  captions     list[str] (at least one string)
  label        int (-1 where the dataset has no classes)
  num_objects  int
  bad          True where the image could not be read (the pipelines skip or mask it)
plus whatever else the dataset carries (boxes, scene, conversations, id).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from typing import Any

import numpy as np

from mmjax.data import transforms

log = logging.getLogger(__name__)

# Splits up to this size on disk are held in memory (shapes at 64 px: ~15 MB).
IN_MEMORY_BYTES = 256 << 20


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(value) -> list[str]:
  if isinstance(value, (str, bytes)):
    return [_text(value)]
  return [_text(v) for v in np.asarray(value, dtype=object).reshape(-1)]


def _lookup(record: dict, key: str):
  """Nested feature by "a/b" path (e.g. coco_captions' "captions/text")."""
  value = record
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = list(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"feature {key!r} not found (at {part!r}; available: {have}); "
                     f"set data.image_key / data.text_key / data.label_key")
    value = value[part]
  return value


class TfdsSource:
  """A TFDS array_record split, as example dicts.

  Splits whose features are all flat and simple (our embedded datasets, and
  many others) are decoded here straight from the records, several times
  faster than TFDS's generic decoder; the rest go through
  `builder.as_data_source`.
  """

  may_skip = False  # every record holds an image

  def __init__(self, builder, split: str, *, image_key: str = "image", text_key: str = "captions",
               label_key: str | None = "label"):
    splits = list(builder.info.splits.keys())
    if split not in splits:
      raise ValueError(f"split {split!r} not in {builder.name} (splits: {splits})")
    self.name = f"{builder.name}/{split}"
    self._image_key, self._text_key, self._label_key = image_key, text_key, label_key
    features = builder.info.features
    self._has_label = bool(label_key) and label_key.split("/")[0] in features
    self._extra = [k for k in ("boxes", "scene", "num_objects") if k in features]
    self._layout = _flat_layout(features)
    if self._layout is not None:
      from array_record.python import array_record_data_source
      paths = [os.fspath(p) for p in builder.info.splits[split].filepaths]
      self._records = array_record_data_source.ArrayRecordDataSource(paths)
      if sum(os.path.getsize(p) for p in paths) <= IN_MEMORY_BYTES:
        # A small split is read once, in large batched reads: one random read
        # costs ~100 us, more than decoding the record.
        n = len(self._records)
        self._records = [r for i in range(0, n, 4096)
                         for r in self._records.__getitems__(range(i, min(i + 4096, n)))]
    else:
      self._records = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._example(self._records[int(index)])

  def _example(self, record) -> dict[str, Any]:
    if self._layout is not None:
      record = _decode_flat(record, self._layout)
    image = _lookup(record, self._image_key)
    image = transforms.decode(image) if isinstance(image, bytes) else np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    elif image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    example = {
        "image": image,
        "captions": _texts(_lookup(record, self._text_key)),
        "label": int(_lookup(record, self._label_key)) if self._has_label else -1,
        "num_objects": 1,
        "bad": False,
    }
    for key in self._extra:
      value = record[key]
      example[key] = int(value) if key == "num_objects" else _text(value)
    return example

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {len(self)} examples)"


def _flat_layout(features) -> dict[str, tuple] | None:
  """name -> how to read it from a tf.Example, or None if any feature needs TFDS."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.features import tensor_feature
  layout = {}
  for name, feature in features.items():
    if isinstance(feature, (tfds.features.ClassLabel, tfds.features.Scalar)):
      if not np.issubdtype(feature.np_dtype, np.integer):
        return None
      layout[name] = ("int",)
    elif isinstance(feature, tfds.features.Text):
      layout[name] = ("text",)
    elif isinstance(feature, tfds.features.Image):
      layout[name] = ("encoded",)  # decoded by `transforms.decode`
    elif isinstance(feature, tfds.features.Sequence) and isinstance(
        feature.feature, tfds.features.Text):
      layout[name] = ("texts",)
    elif (isinstance(feature, tfds.features.Tensor) and feature.shape
          and None not in feature.shape and getattr(feature, "_encoding", None) in (
              tensor_feature.Encoding.ZLIB, tensor_feature.Encoding.BYTES)):
      compressed = feature._encoding == tensor_feature.Encoding.ZLIB  # pylint: disable=protected-access
      layout[name] = ("raw", compressed, feature.np_dtype, tuple(feature.shape))
    else:
      return None
  return layout


def _decode_flat(serialized: bytes, layout: dict[str, tuple]) -> dict[str, Any]:
  from tensorflow_datasets.proto import tf_example_pb2
  fields = tf_example_pb2.Example.FromString(serialized).features.feature
  out = {}
  for name, spec in layout.items():
    field = fields[name]
    kind = spec[0]
    if kind == "int":
      out[name] = int(field.int64_list.value[0])
    elif kind == "text":
      out[name] = field.bytes_list.value[0].decode("utf-8")
    elif kind == "texts":
      out[name] = [v.decode("utf-8") for v in field.bytes_list.value]
    elif kind == "encoded":
      out[name] = field.bytes_list.value[0]
    else:
      _, compressed, dtype, shape = spec
      data = field.bytes_list.value[0]
      out[name] = np.frombuffer(zlib.decompress(data) if compressed else data,
                                dtype).reshape(shape)
  return out


class LlavaSource:
  """LLaVA instruction JSON plus an image folder.

  The JSON is a list of {"id", "image" (relative path, optional), "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}.
  An unreadable image is counted and logged and the example marked `bad`, or,
  with `fatal_bad_images`, raises.
  """

  may_skip = True  # unreadable images and text-only records

  def __init__(self, json_path: str, image_folder: str | None = None, *,
               fatal_bad_images: bool = False):
    if not json_path or not os.path.isfile(json_path):
      raise FileNotFoundError(f"LLaVA json file not found: {json_path!r} (set data.json_path)")
    if image_folder and not os.path.isdir(image_folder):
      raise FileNotFoundError(f"LLaVA image folder not found: {image_folder!r} "
                              f"(set data.image_folder)")
    with open(json_path, encoding="utf-8") as f:
      records = json.load(f)
    if not isinstance(records, list):
      raise ValueError(f"{json_path}: expected a JSON list of records, "
                       f"got {type(records).__name__}")
    for i, r in enumerate(records[:100]):  # a cheap format check, not a full scan
      if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
        raise ValueError(f"{json_path}: record {i} has no 'conversations' list")
    self.json_path, self.image_folder = json_path, image_folder or ""
    self.fatal_bad_images = fatal_bad_images
    # Compact bytes, not dicts: a fraction of the memory for 665k records, and
    # cheap to send to worker processes.
    self._records = [json.dumps(r, separators=(",", ":")).encode() for r in records]
    self._lock = threading.Lock()
    self.num_bad = 0

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = json.loads(self._records[int(index)])
    conversations = [{"from": str(t.get("from", "")), "value": str(t.get("value", ""))}
                     for t in record["conversations"]]
    answers = [t["value"] for t in conversations if t["from"] == "gpt"]
    example = {
        "id": str(record.get("id", index)),
        "image": None,
        "captions": [answers[0] if answers else ""],
        "conversations": json.dumps(conversations),
        "label": -1,
        "num_objects": 0,
        "bad": False,
    }
    if record.get("image"):
      path = os.path.join(self.image_folder, record["image"])
      try:
        with open(path, "rb") as f:
          example["image"] = transforms.decode(f.read())
      except Exception as e:  # any unreadable file: missing, truncated, not an image
        example["bad"] = True
        self._report_bad(path, e)
    return example

  def _report_bad(self, path: str, error: Exception) -> None:
    if self.fatal_bad_images:
      raise ValueError(f"unreadable image {path}: {error} "
                       f"(set data.fatal_bad_images=False to skip such images)") from error
    with self._lock:
      self.num_bad += 1
      count = self.num_bad
    log.warning("skipping unreadable image %s (%s: %s); %d skipped so far in %s",
                path, type(error).__name__, error, count, self.json_path)

  def __repr__(self) -> str:
    return f"LlavaSource({self.json_path}, {len(self)} records)"
