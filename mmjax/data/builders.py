"""TFDS builders (array_record, no TensorFlow) for the embedded datasets.

`prepare(name)` writes a dataset once into the data dir ($MMJAX_DATA_DIR or
~/.cache/mmjax/tfds), with its default tokenizer beside the records, and
returns the builder; `builder.as_data_source(split)` reads it. Any other TFDS
dataset already prepared as array_record is opened by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from mmjax.data import shapes
from mmjax.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "an image of the digit {}.",
    "a drawing of the digit {}.",
)


def default_data_dir() -> str:
  return os.environ.get("MMJAX_DATA_DIR") or os.path.expanduser("~/.cache/mmjax/tfds")


class OfflineBuilder(tfds.core.GeneratorBasedBuilder):
  """Base for builders that download nothing (TFDS without TensorFlow)."""

  # So TFDS looks for no checksums file beside the code; finding it would
  # import importlib_resources, which TFDS does not install.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


# ---------------------------------------------------------------------------
# shapes


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 64
  num_train: int = 20000
  num_validation: int = 1000
  num_test: int = 2000
  seed: int = 0
  single_fraction: float = 0.5
  held_out_fraction: float = 0.15
  num_captions: int = 5
  vocab_size: int = 1000


class ShapesBuilder(OfflineBuilder):
  """Synthetic coloured shapes with captions, boxes and the symbolic scene."""

  name = "shapes"
  # Prepared data is reused by version, the generator's (shapes.VERSION).
  VERSION = tfds.core.Version(shapes.VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    s = cfg.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedurally rendered coloured shapes with captions and boxes.",
        # Records stay in index order (record i is example i); grain shuffles.
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": _image_feature(s),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=cfg.num_captions),
            "boxes": tfds.features.Text(),
            "scene": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=shapes.class_names()),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(
            held_out_labels=shapes.held_out_labels(cfg.held_out_fraction),
            prompt_templates=list(shapes.PROMPT_TEMPLATES)),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    corpus = shapes.tokenizer_corpus(
        cfg.seed, cfg.num_train, image_size=cfg.image_size, single_fraction=cfg.single_fraction,
        held_out_fraction=cfg.held_out_fraction, num_captions=cfg.num_captions)
    _write_tokenizer(self.data_dir, corpus, cfg.vocab_size)
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config
    for i in tqdm(range(n), desc=f"shapes {split}", unit="img", leave=False):
      ex = shapes.make_example(cfg.seed, split, i, image_size=cfg.image_size,
                               single_fraction=cfg.single_fraction,
                               held_out_fraction=cfg.held_out_fraction,
                               num_captions=cfg.num_captions)
      yield i, ex


# ---------------------------------------------------------------------------
# digits


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  test_fraction: float = 0.2
  seed: int = 0
  num_captions: int = 5
  vocab_size: int = 400


class DigitsBuilder(OfflineBuilder):
  """sklearn's 8x8 handwritten digits, upsampled to RGB, with captions."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    s = cfg.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="sklearn load_digits, upsampled to RGB, with captions.",
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": _image_feature(s),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=cfg.num_captions),
            "label": tfds.features.ClassLabel(names=list(DIGIT_WORDS)),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(prompt_templates=list(DIGITS_TEMPLATES)),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download
    digits = load_digits()
    order = np.random.default_rng(cfg.seed).permutation(len(digits.target))
    n_test = int(round(cfg.test_fraction * len(order)))
    splits = {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}
    corpus = [c for i in splits["train"] for c in digit_captions(int(digits.target[i]), i, 100)]
    corpus += [t.format(w) for t in DIGITS_TEMPLATES for w in DIGIT_WORDS]
    _write_tokenizer(self.data_dir, corpus, cfg.vocab_size)
    return {split: self._generate_examples(split, digits.images, digits.target, idx)
            for split, idx in splits.items()}

  def _generate_examples(self, split, images, targets, indices):
    from PIL import Image
    cfg = self.builder_config
    for i in tqdm(indices, desc=f"digits {split}", unit="img", leave=False):
      # 0..16 ink -> dark ink on white paper, bicubic upsampling.
      gray = Image.fromarray((255 - images[i] * (255 / 16)).astype(np.uint8), mode="L")
      gray = gray.resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
      label = int(targets[i])
      yield int(i), {"image": np.asarray(gray.convert("RGB")),
                     "captions": digit_captions(label, int(i), cfg.num_captions),
                     "label": label, "num_objects": 1}


def digit_captions(label: int, index: int, count: int) -> list[str]:
  """`count` paraphrases for a digit, deterministic per example."""
  word = DIGIT_WORDS[label]
  options = [
      f"a photo of the digit {word}", f"a handwritten {label}", f"a handwritten {word}",
      f"the number {word}", f"the digit {label}", f"an image of a handwritten {word}",
      f"a scanned digit: {label}", f"a drawing of {shapes.article(word)}", f"{word}",
      f"a small grayscale picture of the number {label}",
  ]
  picked = np.random.default_rng([label, index]).permutation(len(options))
  return [options[j] for j in picked[:min(count, len(options))]]


# ---------------------------------------------------------------------------
# prepare / open


_EMBEDDED: dict[str, tuple[type, type]] = {
    "shapes": (ShapesBuilder, ShapesConfig),
    "digits": (DigitsBuilder, DigitsConfig),
}
EMBEDDED = tuple(_EMBEDDED)


def builder_config(name: str, **builder_kwargs) -> tfds.core.BuilderConfig:
  """The config of an embedded dataset; its name encodes every setting, so sizes never mix."""
  _, cfg_cls = _EMBEDDED[name]
  fields = {f.name for f in dataclasses.fields(cfg_cls)} - {
      f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  unknown = set(builder_kwargs) - fields
  if unknown:
    raise ValueError(f"unknown builder_kwargs {sorted(unknown)} for {name!r}; "
                     f"known: {sorted(fields)}")
  probe = cfg_cls(name="probe", **builder_kwargs)
  parts = [f"{k}{getattr(probe, k)}" for k in sorted(fields)]
  return cfg_cls(name="-".join(parts).replace("_", ""), **builder_kwargs)


def prepare(name: str, data_dir: str | None = None, **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of `name`, writing the embedded datasets on first use."""
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if name not in _EMBEDDED:
    if builder_kwargs:
      raise ValueError(f"builder_kwargs are only for the embedded datasets {EMBEDDED}, "
                       f"not for {name!r}")
    return open_prepared(name, data_dir)
  cls, _ = _EMBEDDED[name]
  config = builder_config(name, **builder_kwargs)
  with _quiet_tfds():
    builder = cls(config=config, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  # Several processes of one job may start together: one writes, the rest wait.
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with _quiet_tfds():
      builder = cls(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      with _own_progress_bars():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def open_prepared(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """A TFDS dataset ("name", "name/config" or "name:version") prepared as array_record.

  Read from its files (features.json), without the builder's code, which often
  imports TensorFlow.
  """
  from tensorflow_datasets.core import read_only_builder
  try:
    with _quiet_tfds():
      builder = read_only_builder.builder_from_files(name, data_dir=data_dir,
                                                     file_format="array_record")
  except Exception as e:  # tfds raises several types for a dataset it cannot find
    base = name.split(":")[0].split("/")[0]
    if base in tfds.list_builders(with_community_datasets=False):
      raise ValueError(
          f"TFDS dataset {name!r} is not prepared under {data_dir}; nothing is downloaded at "
          f"run time, so prepare it first (on a machine with TensorFlow): tfds build {base} "
          f"--data_dir={data_dir} --file_format=array_record") from e
    raise ValueError(
        f"unknown dataset {name!r}: known are {list(EMBEDDED) + ['llava']} and the TFDS "
        f"datasets prepared under {data_dir}: {prepared_names(data_dir)}") from e
  formats = [f.value if hasattr(f, "value") else str(f)
             for f in (builder.info.file_format, *getattr(builder.info, "alternative_file_formats",
                                                          ()))]
  if "array_record" not in formats:
    raise ValueError(f"TFDS dataset {name!r} under {data_dir} is stored as {formats}; grain "
                     f"needs array_record: rebuild it with --file_format=array_record")
  return builder


def prepared_names(data_dir: str) -> list[str]:
  if not os.path.isdir(data_dir):
    return []
  return sorted(d for d in os.listdir(data_dir)
                if not d.startswith(".") and d != "downloads"
                and os.path.isdir(os.path.join(data_dir, d)))


def tokenizer_path(builder: tfds.core.DatasetBuilder) -> str:
  return os.path.join(os.fspath(builder.data_dir), TOKENIZER_FILE)


# ---------------------------------------------------------------------------
# helpers


def _image_feature(size: int) -> tfds.features.Tensor:
  # Raw pixels, zlib-compressed: reading needs no image decoder (several times
  # faster than PNG through PIL) and flat synthetic images compress well.
  return tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                              encoding=tfds.features.Encoding.ZLIB)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (TFDS Image features need encoded images without TensorFlow)."""
  import io
  from PIL import Image
  buf = io.BytesIO()
  # compress_level 1: a little larger than the default, several times faster.
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _write_tokenizer(folder, corpus: list[str], vocab_size: int) -> None:
  tok = tokenizer_lib.train_sentencepiece(corpus, vocab_size)
  os.makedirs(os.fspath(folder), exist_ok=True)
  tok.save(os.path.join(os.fspath(folder), TOKENIZER_FILE))


@contextlib.contextmanager
def _quiet_tfds():
  """Hides TFDS's warnings about our (intended) custom configs and fresh folders."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@contextlib.contextmanager
def _own_progress_bars():
  """Our bars know each split's size; TFDS's own ones do not."""
  from tensorflow_datasets.core.utils import tqdm_utils
  was = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def feature_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  return list(builder.info.features.keys())


def label_names(builder: tfds.core.DatasetBuilder, key: str = "label") -> list[str] | None:
  feature = builder.info.features
  for part in key.split("/"):
    if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature.keys():
      return None
    feature = feature[part]
  return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


def metadata(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  return dict(builder.info.metadata or {})

