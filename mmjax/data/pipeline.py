"""grain pipelines: per-process shards, seeded shuffle, checkpointable train iterators,
and eval iterators that cover a split exactly once across all processes.

The trainer calls `train_iterator`, `eval_iterator`, `class_names`,
`prompt_templates` and `dataset_tokenizer` with the `data` part of an experiment
config; `default_data_config(name)` lists every key.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np

from mmjax.data import builders, shapes, sources, transforms, webdataset
from mmjax.data import tokenizer as tokenizer_lib

GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)

# Per dataset: (image_size, context_length, eval_split, builder_kwargs defaults).
_DEFAULTS = {
    # The longest shapes caption is ~32 tokens; 40 leaves room for BOS/EOS.
    "shapes": (64, 40, "validation", dict(num_train=20000, num_validation=1000, num_test=2000,
                                          seed=0, single_fraction=0.5, held_out_fraction=0.15)),
    "digits": (32, 16, "test", dict(test_fraction=0.2, seed=0)),
}


def default_data_config(name: str = "shapes") -> ml_collections.ConfigDict:
  """Every data key with its default; experiment configs start from this."""
  image_size, context_length, eval_split, builder_kwargs = _DEFAULTS.get(
      name, (224, 77, "validation", {}))
  builder_kwargs = dict(builder_kwargs)
  return ml_collections.ConfigDict({
      "name": name,  # shapes | digits | llava | webdataset | any TFDS name as array_record
      "data_dir": None,  # None: $MMJAX_DATA_DIR or ~/.cache/mmjax/tfds
      "image_size": image_size,
      "context_length": context_length,
      "train_split": "train",
      "eval_split": eval_split,
      "transforms": {
          "normalize": "clip",  # clip | minus_one_one | zero_one
          "random_resized_crop": False,
          "crop_scale": (0.5, 1.0),
          # Off by default: a flip turns "left" into "right" (captions are then
          # mirrored too, but digits have no mirror image).
          "hflip": False,
          # Swap rows and columns of half the images (image-only tasks: vit, mae;
          # captions are not rewritten). Makes rows and columns alike to the model.
          "transpose": False,
          "pad_to_square": name == "llava",  # LLaVA 1.5 pads with its mean colour
      },
      "num_workers": 0,  # grain worker processes; 0 = in this process
      "read_threads": 0,  # threads per example (helps with slow storage, e.g. LLaVA images)
      "prefetch": 2,  # batches made ahead (by a thread, or per worker process)
      "builder_kwargs": builder_kwargs,  # sizes of the embedded datasets
      # generic TFDS: feature paths, "a/b" for nested ones; webdataset: a sample's
      # fields, ";" between alternatives
      "image_key": "jpg;png;jpeg;webp" if name == "webdataset" else "image",
      "text_key": "txt" if name == "webdataset" else "captions",
      "label_key": None if name == "webdataset" else "label",
      "urls": None,  # webdataset: the train shards, "DIR/{00000..00099}.tar" or gs://, s3://
      "eval_urls": None,  # webdataset: the shards of the eval split
      "class_names": None,  # zero-shot classes by label, for a dataset that names none
      "held_out_labels": None,  # labels never seen in training, scored apart
      "tokenizer": None,  # path to .model / tokenizer.json; None = the dataset's own
      "prompt_templates": None,  # list overriding the dataset's templates
      "json_path": None,  # llava: instruction JSON (train)
      "eval_json_path": None,  # llava: JSON for eval; None = json_path
      "image_folder": None,  # llava: folder that the JSON's image paths are relative to
      "fatal_bad_images": False,  # True: an unreadable image stops the run
      "return_index": False,  # add each example's record index to train batches
      # Train on a fixed random subset of the train split (e.g. 0.1 of the labels
      # for a data-efficiency study); the subset depends on label_fraction_seed
      # only, so every run and seed of a study sees the same examples.
      "label_fraction": 1.0,
      "label_fraction_seed": 0,
  })


# ---------------------------------------------------------------------------
# The trainer's entry points


def train_iterator(data_cfg, *, tokenizer=None, batch_size: int, seed: int,
                   shard_index: int | None = None, shard_count: int | None = None,
                   example_fn: grain.transforms.RandomMap | None = None) -> "TrainIterator":
  """Infinite, checkpointable iterator of this process's train batches.

  `batch_size` is per process. Batches: image float32 [b, S, S, 3], text int32
  [b, context_length] (one caption drawn per example and epoch), label int32 [b].
  A task with its own batch layout passes `example_fn`: a RandomMap from
  (record index, example) to a dict of arrays, or None to skip the example
  (no tokenizer is then needed). `data.label_fraction` < 1 keeps that fraction
  of the split (`subset_indices`).
  """
  shard_index, shard_count = _shard(shard_index, shard_count)
  if tokenizer is None and example_fn is None:
    tokenizer = dataset_tokenizer(data_cfg)
  source = make_source(data_cfg, data_cfg.train_split)
  fraction = float(_opt(data_cfg, "label_fraction", 1.0) or 1.0)
  if fraction < 1.0:
    source = SubsetSource(source, subset_indices(
        len(source), fraction, int(_opt(data_cfg, "label_fraction_seed", 0) or 0)))
  if len(source) < shard_count:
    raise ValueError(f"{source!r} has fewer examples than the {shard_count} shards")
  shard_seed = _derive_seed(seed, shard_index, shard_count)
  ds = grain.MapDataset.source(source).map_with_index(
      _AttachIndex(len(source), getattr(source, "indices", None)))
  ds = ds[shard_index::shard_count]
  ds = ds.shuffle(seed=shard_seed).repeat(None)
  ds = ds.random_map(example_fn or _TrainExample(data_cfg, tokenizer), seed=shard_seed)
  workers, prefetch = int(_opt(data_cfg, "num_workers", 0)), int(_opt(data_cfg, "prefetch", 2))
  if source.may_skip or example_fn is not None:
    # Unreadable images became None above: the iter dataset skips them, then batches.
    ds = _to_iter(ds, data_cfg, batch_size).batch(batch_size, drop_remainder=True)
  else:
    # Nothing is skipped, so batch as a MapDataset: read threads, if any, each
    # make whole batches, with one hand-off per batch instead of per example.
    ds = _to_iter(ds.batch(batch_size, drop_remainder=True), data_cfg, 1)
  if workers > 0:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
  else:
    ds = _thread_prefetch(ds, prefetch)
  meta = {"dataset": data_cfg.name, "split": data_cfg.train_split, "seed": int(seed),
          "batch_size": int(batch_size), "shard_index": shard_index, "shard_count": shard_count,
          "num_workers": workers, "label_fraction": fraction}
  return TrainIterator(ds, meta, source)


def eval_iterator(data_cfg, *, tokenizer=None, split: str | None = None, batch_size: int,
                  shard_index: int | None = None, shard_count: int | None = None,
                  example_fn: grain.transforms.Map | None = None) -> "EvalBatches":
  """Finite batches covering `split` exactly once across all processes.

  Every process yields the same number of batches (collectives stay in step);
  padding rows and unreadable images carry mask False. Keys: image, text
  (caption 0), label, num_objects, mask, index (record index, -1 for padding).
  A task with its own layout passes `example_fn`: a Map from (record index,
  example) to a dict with "mask", and a `blank()` padding row.
  """
  shard_index, shard_count = _shard(shard_index, shard_count)
  if example_fn is None:
    tokenizer = dataset_tokenizer(data_cfg) if tokenizer is None else tokenizer
    example_fn = _EvalExample(data_cfg, tokenizer)
  source = make_source(data_cfg, split or data_cfg.eval_split)
  return EvalBatches(source, example_fn, data_cfg, batch_size, shard_index, shard_count)


def class_names(data_cfg) -> list[str]:
  """Zero-shot class names, indexed by `label` (`data.class_names` where set)."""
  if _opt(data_cfg, "class_names"):
    return list(data_cfg.class_names)
  if data_cfg.name == "shapes":
    return shapes.class_names()
  if data_cfg.name == "digits":
    return list(builders.DIGIT_WORDS)
  if data_cfg.name == "llava":
    raise ValueError("the llava source has no classes; zero-shot classification needs a "
                     "dataset with a label feature")
  builder = _builder(data_cfg)
  names = builders.label_names(builder, data_cfg.label_key)
  if names is None:
    raise ValueError(f"TFDS dataset {data_cfg.name!r} has no ClassLabel feature "
                     f"{data_cfg.label_key!r}; set data.label_key")
  return names


def prompt_templates(data_cfg) -> list[str]:
  """Templates with one "{}" for a class name; their embeddings are averaged per class."""
  if _opt(data_cfg, "prompt_templates"):
    return list(data_cfg.prompt_templates)
  if data_cfg.name == "shapes":
    return list(shapes.PROMPT_TEMPLATES)
  if data_cfg.name == "digits":
    return list(builders.DIGITS_TEMPLATES)
  return list(GENERIC_TEMPLATES)


def held_out_labels(data_cfg) -> list[int]:
  """Labels whose compositions never occur in train (shapes, or
  `data.held_out_labels`); [] elsewhere."""
  if _opt(data_cfg, "held_out_labels") is not None:
    return [int(x) for x in data_cfg.held_out_labels]
  if data_cfg.name != "shapes":
    return []
  kwargs = _builder_kwargs(data_cfg)
  return shapes.held_out_labels(kwargs.get("held_out_fraction", 0.15))


def dataset_tokenizer(data_cfg) -> tokenizer_lib.Tokenizer:
  """`data.tokenizer` if set, else the tokenizer prepared with an embedded dataset."""
  return tokenizer_lib.load_tokenizer(tokenizer_file(data_cfg))


def tokenizer_file(data_cfg) -> str:
  """The file `dataset_tokenizer` loads (a folder holding one, for `data.tokenizer`)."""
  if _opt(data_cfg, "tokenizer"):
    return data_cfg.tokenizer
  if data_cfg.name not in builders.EMBEDDED:
    raise ValueError(f"dataset {data_cfg.name!r} ships no tokenizer: set data.tokenizer to a "
                     f"sentencepiece .model or a tokenizer.json")
  return builders.tokenizer_path(_builder(data_cfg))


def make_source(data_cfg, split: str):
  """The random-access example source of one split (see `sources`)."""
  if data_cfg.name == "webdataset":
    train = split == data_cfg.train_split
    urls = data_cfg.urls if train else _opt(data_cfg, "eval_urls")
    if not urls:
      raise ValueError(f"webdataset split {split!r}: set data.{'urls' if train else 'eval_urls'}")
    return webdataset.WebDatasetSource(urls, image_key=data_cfg.image_key,
                                       text_key=data_cfg.text_key,
                                       label_key=_opt(data_cfg, "label_key"))
  if data_cfg.name == "llava":
    path = data_cfg.json_path
    if split != data_cfg.train_split and _opt(data_cfg, "eval_json_path"):
      path = data_cfg.eval_json_path
    return sources.LlavaSource(path, data_cfg.image_folder,
                               fatal_bad_images=bool(data_cfg.fatal_bad_images))
  builder = _builder(data_cfg)
  return sources.TfdsSource(builder, split, image_key=data_cfg.image_key,
                            text_key=data_cfg.text_key, label_key=data_cfg.label_key)


def subset_indices(n: int, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of a fixed random `fraction` of n records (at least one)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
  k = max(1, int(round(fraction * n)))
  return np.sort(np.random.default_rng([int(seed), n]).permutation(n)[:k])


class SubsetSource:
  """The records `indices` of a source, in that order (a train subset)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.may_skip = getattr(source, "may_skip", False)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[int(index)])]

  @property
  def num_bad(self) -> int:
    return getattr(self.source, "num_bad", 0)

  def __repr__(self) -> str:
    return f"SubsetSource({self.source!r}, {len(self)} examples)"


# ---------------------------------------------------------------------------
# Iterators


class TrainIterator:
  """`next()` gives a batch; `get_state()` / `set_state()` resume it exactly."""

  def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any], source):
    self._dataset = dataset
    self._iter = iter(dataset)
    self._meta = meta
    self.source = source

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iter)
    if self._meta["num_workers"]:
      # Out of grain's shared memory into plain arrays, so its blocks are freed now.
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable dict: the grain position plus what it is valid for."""
    return {**self._meta, "grain": _jsonable(self._iter.get_state())}

  def set_state(self, state: dict[str, Any] | str | bytes) -> None:
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    for key in ("dataset", "seed", "batch_size", "shard_index", "shard_count", "num_workers",
                "label_fraction"):
      if key in state and state[key] != self._meta[key]:
        raise ValueError(
            f"data iterator state was saved with {key}={state[key]!r} but this iterator has "
            f"{key}={self._meta[key]!r}; it would not resume to the same batches")
    self._iter.set_state(_from_jsonable(state["grain"]))

  def close(self) -> None:
    """Stops grain's worker processes and threads (also done when garbage collected)."""
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()

  @property
  def num_bad_images(self) -> int:
    """Unreadable images skipped so far by this process (worker processes log their own)."""
    return getattr(self.source, "num_bad", 0)


class EvalBatches:
  """A re-iterable, finite sequence of padded eval batches (`len()` is the batch count)."""

  def __init__(self, source, example_fn, data_cfg, batch_size: int, shard_index: int,
               shard_count: int):
    self.source = source
    self._example_fn = example_fn
    self._cfg = data_cfg
    self.batch_size = batch_size
    self.shard_index, self.shard_count = shard_index, shard_count
    self.num_examples = len(source)
    per_process = math.ceil(self.num_examples / shard_count)
    self._num_batches = math.ceil(per_process / batch_size)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    ds = grain.MapDataset.source(self.source).map_with_index(_AttachIndex(len(self.source)))
    # Unreadable images are masked, never skipped, so this batches as a MapDataset.
    ds = ds[self.shard_index::self.shard_count].map(self._example_fn)
    ds = _to_iter(ds.batch(self.batch_size, drop_remainder=False), self._cfg, 1)
    ds = _thread_prefetch(ds, int(_opt(self._cfg, "prefetch", 2)))
    produced = 0
    for batch in ds:
      yield self._pad(batch)
      produced += 1
    # Shards differ by at most one example; all processes run the same steps.
    while produced < self._num_batches:
      yield self._pad(None)
      produced += 1

  def _pad(self, batch: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if batch is None:
      blank = self._example_fn.blank()
      batch = {k: np.asarray(v)[None] for k, v in blank.items()}
      batch = {k: v[:0] for k, v in batch.items()}
    n = len(batch["mask"])
    if n == self.batch_size:
      return batch
    blank = self._example_fn.blank()
    return {k: np.concatenate([v, np.repeat(np.asarray(blank[k])[None], self.batch_size - n, 0)])
            for k, v in batch.items()}


# ---------------------------------------------------------------------------
# Per-example functions (picklable, so worker processes can run them)


class _TrainExample(grain.transforms.RandomMap):
  """Example -> {image, text, label}: random caption, augmentations, tokens."""

  def __init__(self, data_cfg, tokenizer):
    tcfg = data_cfg.transforms
    self._size = int(data_cfg.image_size)
    self._length = int(data_cfg.context_length)
    self._mode = tcfg.normalize
    self._crop = bool(tcfg.random_resized_crop)
    self._crop_scale = tuple(tcfg.crop_scale)
    self._flip = bool(tcfg.hflip)
    self._pad_square = bool(tcfg.pad_to_square)
    if tcfg.get("transpose", False):
      raise ValueError("data.transforms.transpose is for image-only tasks (vit, mae): "
                       "it would not rewrite the captions of a transposed image")
    self._tokenizer = tokenizer
    self._return_index = bool(_opt(data_cfg, "return_index", False))
    transforms.normalize(np.zeros((1, 1, 3), np.uint8), self._mode)  # fail early on a bad mode

  def random_map(self, item, rng: np.random.Generator):
    index, example = item
    if example["bad"] or example["image"] is None:
      return None
    caption = example["captions"][int(rng.integers(len(example["captions"])))]
    flip = self._flip and rng.random() < 0.5
    if flip:
      caption = transforms.mirror_text(caption)
    image = transforms.train_image(example["image"], self._size, rng, mode=self._mode,
                                   random_crop=self._crop, crop_scale=self._crop_scale,
                                   flip=flip, pad_square=self._pad_square)
    out = {"image": image,
           "text": self._tokenizer.encode_batch([caption], self._length)[0],
           "label": np.int32(example["label"])}
    if self._return_index:
      out["index"] = np.int32(index)
    return out


class _EvalExample(grain.transforms.Map):
  """Example -> {image, text (caption 0), label, num_objects, mask, index}."""

  def __init__(self, data_cfg, tokenizer):
    self._size = int(data_cfg.image_size)
    self._length = int(data_cfg.context_length)
    self._mode = data_cfg.transforms.normalize
    self._pad_square = bool(data_cfg.transforms.pad_to_square)
    self._tokenizer = tokenizer

  def map(self, item):
    index, example = item
    if example["bad"] or example["image"] is None:
      out = self.blank()
      out["index"] = np.int32(index)
      return out
    return {
        "image": transforms.preprocess_image(example["image"], self._size, self._mode,
                                             pad_square=self._pad_square),
        "text": self._tokenizer.encode_batch(example["captions"][:1], self._length)[0],
        "label": np.int32(example["label"]),
        "num_objects": np.int32(example["num_objects"]),
        "mask": np.bool_(True),
        "index": np.int32(index),
    }

  def blank(self) -> dict[str, np.ndarray]:
    """A padding row: zeros, label -1, mask False."""
    return {
        "image": np.zeros((self._size, self._size, 3), np.float32),
        "text": np.full((self._length,), self._tokenizer.pad_id, np.int32),
        "label": np.int32(-1),
        "num_objects": np.int32(0),
        "mask": np.bool_(False),
        "index": np.int32(-1),
    }


# ---------------------------------------------------------------------------
# Helpers


class _AttachIndex(grain.transforms.MapWithIndex):
  """Pairs an example with its record index (grain's index grows past len in later
  epochs); `record_ids` maps a subset's positions to the records of the split."""

  def __init__(self, length: int, record_ids: np.ndarray | None = None):
    self._length = length
    self._ids = record_ids

  def map_with_index(self, index: int, example):
    index = index % self._length
    return (index if self._ids is None else int(self._ids[index])), example


def _opt(data_cfg, key: str, default=None):
  # Any attribute-access config works, not only a ConfigDict with every key.
  return getattr(data_cfg, key, default)


def _shard(shard_index, shard_count) -> tuple[int, int]:
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  return shard_index, shard_count


def _ensure_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside an absl app (tests,
  # notebooks) nothing parsed them, so take their defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _derive_seed(seed: int, shard_index: int, shard_count: int) -> int:
  # Shards draw different shuffles and captions from one run seed.
  return int(np.random.SeedSequence([int(seed), shard_index, shard_count]).generate_state(1)[0])


def _to_iter(ds: grain.MapDataset, data_cfg, per_batch: int) -> grain.IterDataset:
  """`read_threads` threads make the elements (examples, or whole batches) ahead."""
  # Threads contend for the GIL: a gain for slow storage (image files), a loss
  # for the small embedded datasets, hence 0 by default.
  threads = max(0, int(_opt(data_cfg, "read_threads", 0)))
  buffer = max(1, int(_opt(data_cfg, "prefetch", 2))) * per_batch if threads else 1
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))


def _thread_prefetch(ds: grain.IterDataset, prefetch: int) -> grain.IterDataset:
  # Whole batches from one background thread: it runs while the trainer waits
  # on the device, and its state still names the batch consumed last.
  if prefetch <= 0:
    return ds
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)


def _builder_kwargs(data_cfg) -> dict[str, Any]:
  kwargs = _opt(data_cfg, "builder_kwargs") or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
  if data_cfg.name in builders.EMBEDDED:
    # Stored at the training size, so no resize at read time.
    kwargs.setdefault("image_size", int(data_cfg.image_size))
  return kwargs


def _builder(data_cfg):
  kwargs = _builder_kwargs(data_cfg) if data_cfg.name in builders.EMBEDDED else {}
  return builders.prepare(data_cfg.name, _opt(data_cfg, "data_dir"), **kwargs)


def _jsonable(state):
  # grain states are dicts of ints and strings; bytes (if any) travel as text.
  if isinstance(state, bytes):
    return {"__bytes__": state.decode("latin-1")}
  if isinstance(state, dict):
    return {k: _jsonable(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return [_jsonable(v) for v in state]
  if isinstance(state, np.integer):
    return int(state)
  return state


def _from_jsonable(state):
  if isinstance(state, dict):
    if set(state) == {"__bytes__"}:
      return state["__bytes__"].encode("latin-1")
    return {k: _from_jsonable(v) for k, v in state.items()}
  if isinstance(state, list):
    return [_from_jsonable(v) for v in state]
  return state
