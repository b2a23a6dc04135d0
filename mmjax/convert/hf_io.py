"""HF model folders on disk: config.json, (sharded) safetensors, tokenizer files.

Reading goes one tensor at a time through `safetensors.safe_open`, so a 7B
checkpoint never sits whole in host memory; writing fills shards of a bounded
size and writes the `model.safetensors.index.json` that transformers reads.
Only numpy and safetensors are needed (bfloat16 comes as ml_dtypes.bfloat16;
where an older safetensors cannot hand it to numpy, the bytes are read from the
file directly). The writer is ours: the format is a JSON header and the raw
little-endian tensors, and numpy alone writes every dtype the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Written beside the weights by an mmjax export, never read as model tensors.
SIDECARS = ("mmjax.safetensors",)

# Tokenizer and processor files copied along with a model (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} holds no config.json: is it a HF model folder?")
  with open(path) as f:
    return json.load(f)


class SafetensorsReader:
  """Tensors of a HF folder by name, from `model.safetensors`, a sharded index, or
  every `*.safetensors` file in it. `get` reads one tensor (or a slice of it)."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
      with open(index) as f:
        self._file_of = dict(json.load(f)["weight_map"])
    else:
      files = sorted(n for n in os.listdir(directory)
                     if n.endswith(".safetensors") and n not in SIDECARS)
      if not files:
        raise FileNotFoundError(
            f"{directory} holds no *.safetensors weights (PyTorch .bin files are not read: "
            f"convert them with transformers' save_pretrained(safe_serialization=True))")
      self._file_of = {}
      for name in files:
        with self._open(name) as f:
          self._file_of.update({k: name for k in f.keys()})
    self._handles: dict[str, Any] = {}

  def _open(self, name: str):
    from safetensors import safe_open
    return safe_open(os.path.join(self.directory, name), framework="np")

  def _handle(self, key: str):
    name = self._file_of[key]
    if name not in self._handles:
      self._handles[name] = self._open(name).__enter__()
    return self._handles[name]

  def keys(self) -> list[str]:
    return sorted(self._file_of)

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """The stored dtype as safetensors names it: F32, BF16, F16, ..."""
    return self._handle(key).get_slice(key).get_dtype()

  def get(self, key: str) -> np.ndarray:
    if key not in self._file_of:
      raise KeyError(f"tensor {key!r} not found in {self.directory}")
    try:
      return self._handle(key).get_tensor(key)
    except TypeError:  # "data type 'bfloat16' not understood" (older safetensors)
      return _read_raw(os.path.join(self.directory, self._file_of[key]), key)

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# safetensors dtype names <-> numpy.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n)), 8 + n


def _read_raw(path: str, key: str) -> np.ndarray:
  header, start = _header(path)
  info = header[key]
  begin, end = info["data_offsets"]
  data = np.fromfile(path, np.uint8, count=end - begin, offset=start + begin)
  return data.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  """One safetensors file: an 8-byte header length, the JSON header (padded to 8
  bytes), then the tensors' little-endian bytes back to back."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
  offset = 0
  for name, array in tensors.items():
    if array.dtype not in _NAMES:
      raise ValueError(f"{name}: dtype {array.dtype} cannot be written to safetensors")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for array in tensors.values():
      if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
      f.write(array.tobytes(order="C"))


def write_safetensors(directory: str, tensors: Iterable[tuple[str, np.ndarray]],
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes (name, array) pairs as `model.safetensors`, or as numbered shards and
  an index when they exceed `max_shard_bytes`. Holds one shard in memory at a time."""
  os.makedirs(directory, exist_ok=True)
  shards: list[tuple[str, list[str]]] = []
  pending: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    nonlocal pending, size
    if pending:
      name = f"shard-{len(shards):05d}.tmp"
      save_file(pending, os.path.join(directory, name), metadata={"format": "pt"})
      shards.append((name, list(pending)))
      pending, size = {}, 0

  for key, array in tensors:
    array = np.asarray(array)
    if size and size + array.nbytes > max_shard_bytes:
      flush()
    pending[key] = array
    size += array.nbytes
    total += array.nbytes
  flush()

  if len(shards) == 1:
    os.replace(os.path.join(directory, shards[0][0]), os.path.join(directory, WEIGHTS_NAME))
    return [WEIGHTS_NAME]
  names, weight_map = [], {}
  for i, (tmp, keys) in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.replace(os.path.join(directory, tmp), os.path.join(directory, name))
    names.append(name)
    weight_map.update({k: name for k in keys})
  with open(os.path.join(directory, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def copy_files(src: str, dst: str, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
  """Copies whichever of `names` exist in `src` into `dst`; returns the copied names."""
  copied = []
  for name in names:
    path = os.path.join(src, name)
    if os.path.isfile(path):
      os.makedirs(dst, exist_ok=True)
      shutil.copyfile(path, os.path.join(dst, name))
      copied.append(name)
  return copied


def ensure_tokenizer_json(directory: str) -> str | None:
  """The path of a tokenizer file our loader reads in `directory`: tokenizer.json
  first (it holds the added tokens, e.g. LLaVA's `<image>`, that a sentencepiece
  tokenizer.model lacks), else tokenizer.model; writes tokenizer.json from the
  slow files (vocab.json + merges.txt) with transformers when only those exist."""
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  if not os.path.exists(os.path.join(directory, "vocab.json")):
    return None
  try:
    from transformers import AutoTokenizer
  except ImportError:
    return None
  tok = AutoTokenizer.from_pretrained(directory)
  tok.save_pretrained(directory)
  path = os.path.join(directory, "tokenizer.json")
  return path if os.path.exists(path) else None
