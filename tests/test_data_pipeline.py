"""grain pipelines: shards, resumption, eval coverage, generic TFDS and LLaVA sources."""

import io
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax import data
from mmjax.data import builders, pipeline, sources, tokenizer, transforms

N_TRAIN, N_VAL = 200, 50


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  cfg = data.default_data_config("shapes")
  cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg.image_size = 32
  cfg.builder_kwargs.num_train = N_TRAIN
  cfg.builder_kwargs.num_validation = N_VAL
  cfg.builder_kwargs.num_test = 20
  cfg.return_index = True
  data.prepare("shapes", cfg.data_dir, image_size=32, **cfg.builder_kwargs)
  return cfg


@pytest.fixture(scope="module")
def tok(cfg):
  return data.dataset_tokenizer(cfg)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches(cfg, tok):
  it = data.train_iterator(cfg, tokenizer=tok, batch_size=8, seed=0, shard_index=0,
                           shard_count=1)
  batch = next(it)
  assert set(batch) == {"image", "text", "label", "index"}
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (8, 40) and batch["text"].dtype == np.int32
  assert batch["label"].dtype == np.int32
  assert ((batch["text"] == tok.eos_id).sum(1) == 1).all()  # one EOS per row: pooling is defined
  # CLIP normalisation: the background grey is near zero, nothing far outside [-2, 2.2].
  assert -2.0 < batch["image"].min() and batch["image"].max() < 2.2
  for row, index in zip(batch["text"], batch["index"]):
    source_captions = it.source[int(index)]["captions"]
    assert tok.decode(row) in source_captions


def test_shards_are_disjoint_and_cover(cfg, tok):
  for count in (2, 4):
    seen = []
    for index in range(count):
      it = data.train_iterator(cfg, tokenizer=tok, batch_size=10, seed=1, shard_index=index,
                               shard_count=count)
      per_shard = N_TRAIN // count
      epoch = np.concatenate([b["index"] for b in _take(it, per_shard // 10)])
      assert len(set(epoch)) == per_shard  # one epoch of a shard: no repeats
      seen.append(set(epoch.tolist()))
    assert set().union(*seen) == set(range(N_TRAIN))
    assert sum(len(s) for s in seen) == N_TRAIN


def test_resume_reproduces_the_next_batches(cfg, tok):
  kwargs = dict(tokenizer=tok, batch_size=16, seed=7, shard_index=1, shard_count=2)
  it = data.train_iterator(cfg, **kwargs)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  expected = _take(it, 4)  # crosses the shard's epoch boundary (100 examples)
  resumed = data.train_iterator(cfg, **kwargs)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 4)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  with pytest.raises(ValueError, match="shard_count"):
    data.train_iterator(cfg, **{**kwargs, "shard_count": 4}).set_state(state)


def test_seed_changes_order_and_captions_vary_per_epoch(cfg, tok):
  a = next(data.train_iterator(cfg, tokenizer=tok, batch_size=16, seed=0, shard_index=0,
                               shard_count=1))
  b = next(data.train_iterator(cfg, tokenizer=tok, batch_size=16, seed=1, shard_index=0,
                               shard_count=1))
  assert not np.array_equal(a["index"], b["index"])
  it = data.train_iterator(cfg, tokenizer=tok, batch_size=N_TRAIN, seed=0, shard_index=0,
                           shard_count=1)
  e1, e2 = next(it), next(it)
  text1 = {int(i): tuple(t) for i, t in zip(e1["index"], e1["text"])}
  text2 = {int(i): tuple(t) for i, t in zip(e2["index"], e2["text"])}
  assert sum(text1[i] != text2[i] for i in text1) > N_TRAIN // 2


@pytest.mark.parametrize("count", [1, 2, 4])
def test_eval_covers_the_split_exactly_once(cfg, tok, count):
  seen, lengths = [], []
  for index in range(count):
    batches = data.eval_iterator(cfg, tokenizer=tok, split="validation", batch_size=8,
                                 shard_index=index, shard_count=count)
    got = list(batches)
    lengths.append(len(got))
    assert len(got) == len(batches)
    for b in got:
      assert b["image"].shape == (8, 32, 32, 3) and b["mask"].dtype == np.bool_
      assert set(b) == {"image", "text", "label", "num_objects", "mask", "index"}
      assert (b["label"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
      assert (b["num_objects"][b["mask"]] >= 1).all()
      seen.extend(b["index"][b["mask"]].tolist())
  assert len(set(lengths)) == 1  # every process runs the same number of eval steps
  assert sorted(seen) == list(range(N_VAL))


def test_eval_text_is_caption_zero(cfg, tok):
  batch = next(iter(data.eval_iterator(cfg, tokenizer=tok, split="test", batch_size=4,
                                       shard_index=0, shard_count=1)))
  source = pipeline.make_source(cfg, "test")
  for row, index in zip(batch["text"], batch["index"]):
    assert tok.decode(row) == source[int(index)]["captions"][0]


def test_worker_processes_resume(cfg, tok):
  worker_cfg = cfg.copy_and_resolve_references()
  worker_cfg.num_workers = 1
  kwargs = dict(tokenizer=tok, batch_size=8, seed=3, shard_index=0, shard_count=1)
  it = data.train_iterator(worker_cfg, **kwargs)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  resumed = data.train_iterator(worker_cfg, **kwargs)
  resumed.set_state(state)
  got = _take(resumed, 2)
  it.close()
  resumed.close()
  for want, have in zip(expected, got):
    np.testing.assert_array_equal(want["index"], have["index"])
    np.testing.assert_array_equal(want["image"], have["image"])


def test_fast_decoding_matches_tfds(cfg, monkeypatch):
  builder = pipeline._builder(cfg)
  reference = builder.as_data_source("validation")
  in_memory = pipeline.make_source(cfg, "validation")
  monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)
  from_file = pipeline.make_source(cfg, "validation")
  assert isinstance(in_memory._records, list) and not isinstance(from_file._records, list)
  for i in (0, 17, N_VAL - 1):
    want = reference[i]
    for got in (in_memory[i], from_file[i]):
      np.testing.assert_array_equal(got["image"], want["image"])
      assert got["captions"] == [c.decode() for c in want["captions"]]
      assert (got["label"], got["num_objects"]) == (want["label"], want["num_objects"])
      assert (got["boxes"], got["scene"]) == (want["boxes"].decode(), want["scene"].decode())


def test_class_names_and_templates(cfg):
  names = data.class_names(cfg)
  assert len(names) == 48 and names[0] == "red circle"
  assert all("{}" in t for t in data.prompt_templates(cfg))
  held = data.held_out_labels(cfg)
  assert 0 < len(held) < len(names)


def test_unknown_dataset_fails_at_start(cfg, tok):
  bad = cfg.copy_and_resolve_references()
  bad.name = "not_a_dataset"
  with pytest.raises(ValueError, match=r"not_a_dataset.*shapes"):
    data.train_iterator(bad, tokenizer=tok, batch_size=4, seed=0, shard_index=0, shard_count=1)


# ---------------------------------------------------------------------------
# Any TFDS dataset prepared as array_record, by name


class MmjaxTestCaptions(builders.OfflineBuilder):
  """A tiny non-embedded dataset with nested captions and non-square images."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "photo": tfds.features.Image(shape=(20, 30, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        "kind": tfds.features.ClassLabel(names=["cat", "dog"]),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "validation": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      image = np.full((20, 30, 3), 10 * i, np.uint8)
      yield i, {"photo": image, "captions": {"text": [f"a photo number {i}", "another"]},
                "kind": i % 2}


def test_generic_tfds_dataset_by_name(tmp_path, tok):
  builder = MmjaxTestCaptions(data_dir=str(tmp_path), file_format="array_record")
  # Images go in encoded: TFDS encodes numpy images with TensorFlow, absent here.
  gen = builder._generate_examples
  builder._generate_examples = lambda n: (
      (k, {**ex, "photo": builders.encode_png(ex["photo"])}) for k, ex in gen(n))
  builder.download_and_prepare()
  cfg = data.default_data_config("mmjax_test_captions")
  cfg.data_dir = str(tmp_path)
  cfg.image_size = 16
  cfg.context_length = 16
  cfg.image_key, cfg.text_key, cfg.label_key = "photo", "captions/text", "kind"
  assert data.class_names(cfg) == ["cat", "dog"]
  batch = next(data.train_iterator(cfg, tokenizer=tok, batch_size=4, seed=0, shard_index=0,
                                   shard_count=1))
  assert batch["image"].shape == (4, 16, 16, 3)
  evals = list(data.eval_iterator(cfg, tokenizer=tok, batch_size=4, shard_index=0,
                                  shard_count=1))
  assert sum(b["mask"].sum() for b in evals) == 5
  assert tok.decode(evals[0]["text"][0]).startswith("a photo number")
  cfg.text_key = "caption"
  with pytest.raises(KeyError, match="caption"):
    next(data.train_iterator(cfg, tokenizer=tok, batch_size=4, seed=0, shard_index=0,
                             shard_count=1))


# ---------------------------------------------------------------------------
# LLaVA JSON + image folder


@pytest.fixture
def llava(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  records = []
  for i in range(6):
    Image.new("RGB", (40 + 8 * i, 30), (20 * i, 100, 200)).save(folder / f"{i}.jpg")
    records.append({"id": f"img{i}", "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": f"a blue picture number {i}"}]})
  (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  records.append({"id": "corrupt", "image": "corrupt.jpg", "conversations": [
      {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]})
  records.append({"id": "missing", "image": "missing.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]})
  records.append({"id": "long", "image": "0.jpg", "conversations": [
      {"from": "human", "value": "<image>\nTell me a lot."},
      {"from": "gpt", "value": " ".join(["a very long answer"] * 50)}]})
  records.append({"id": "text-only", "conversations": [
      {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hi"}]})
  path = tmp_path / "llava.json"
  path.write_text(json.dumps(records))
  cfg = data.default_data_config("llava")
  cfg.json_path = str(path)
  cfg.image_folder = str(folder)
  cfg.image_size = 24
  cfg.context_length = 12
  cfg.read_threads = cfg.prefetch = 0  # nothing read ahead: exact counting of skipped images
  cfg.transforms.pad_to_square = True
  return cfg


def test_llava_skips_and_counts_bad_images(llava, tok, caplog):
  it = data.train_iterator(llava, tokenizer=tok, batch_size=7, seed=0, shard_index=0,
                           shard_count=1)
  with caplog.at_level(logging.WARNING):
    batch = next(it)  # 7 readable images among 10 records: one epoch
  assert batch["image"].shape == (7, 24, 24, 3)
  assert it.num_bad_images == 2
  assert "corrupt.jpg" in caplog.text and "missing.png" in caplog.text
  # The long answer is truncated to the context, ending in EOS; never dropped.
  rows = [r for r in batch["text"] if tok.decode(r).startswith("a very long answer")]
  assert len(rows) == 1 and rows[0][-1] == tok.eos_id


def test_llava_eval_masks_bad_images(llava, tok):
  batches = list(data.eval_iterator(llava, tokenizer=tok, split="train", batch_size=4,
                                    shard_index=0, shard_count=1))
  assert len(batches) == 3
  valid = sum(int(b["mask"].sum()) for b in batches)
  assert valid == 7  # corrupt, missing and text-only records are masked


def test_llava_fatal_bad_images(llava, tok):
  llava.fatal_bad_images = True
  source = pipeline.make_source(llava, "train")
  with pytest.raises(ValueError, match="corrupt.jpg"):
    source[6]


def test_llava_missing_json_is_named(llava, tok, tmp_path):
  llava.json_path = str(tmp_path / "nowhere.json")
  with pytest.raises(FileNotFoundError, match="nowhere.json"):
    data.train_iterator(llava, tokenizer=tok, batch_size=2, seed=0, shard_index=0,
                        shard_count=1)


# ---------------------------------------------------------------------------
# Transforms


def test_preprocess_image_resizes_crops_and_normalises():
  mean = tuple(int(round(255 * m)) for m in transforms.CLIP_MEAN)
  image = Image.new("RGB", (60, 30), mean)
  out = transforms.preprocess_image(image, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert np.abs(out).max() < 0.02  # CLIP mean -> 0
  out = transforms.preprocess_image(np.full((8, 8, 3), 255, np.uint8), 8, "minus_one_one")
  np.testing.assert_allclose(out, 1.0)
  padded = transforms.pad_to_square(Image.new("RGB", (40, 20), (0, 0, 0)))
  assert padded.size == (40, 40)
  assert padded.getpixel((0, 0)) == transforms.LLAVA_PAD_COLOR
  raw = np.random.default_rng(0).integers(0, 256, (5, 5, 3)).astype(np.uint8)
  np.testing.assert_array_equal(transforms.denormalize(transforms.normalize(raw)), raw)
  with pytest.raises(ValueError, match="clip"):
    transforms.normalize(raw, "imagenet")


def test_random_crop_and_flip_mirror_captions():
  rng = np.random.default_rng(0)
  image = np.zeros((32, 32, 3), np.uint8)
  image[:, :8] = 255  # white on the left
  out = transforms.train_image(image, 32, rng, mode="zero_one", flip=True)
  assert out[:, -8:].min() == 1.0 and out[:, :8].max() == 0.0
  crop = transforms.train_image(image, 16, rng, random_crop=True, crop_scale=(0.3, 1.0))
  assert crop.shape == (16, 16, 3)
  assert transforms.mirror_text("a red circle to the left of a star, right?") == (
      "a red circle to the right of a star, left?")


def test_transpose_swaps_rows_and_columns_and_captioned_data_refuses_it(cfg, tok):
  rng = np.random.default_rng(0)
  image = np.zeros((32, 32, 3), np.uint8)
  image[:8] = 255  # white at the top
  out = transforms.train_image(image, 32, rng, mode="zero_one", transpose=True)
  assert out[:, :8].min() == 1.0 and out[:, 8:].max() == 0.0  # now on the left
  crop = transforms.train_image(image, 32, rng, mode="zero_one", flip=True, transpose=True)
  np.testing.assert_array_equal(crop, out)  # a left-right mirror of this image changes nothing
  bad = cfg.copy_and_resolve_references()
  bad.transforms.transpose = True
  with pytest.raises(ValueError, match="transpose"):
    data.train_iterator(bad, tokenizer=tok, batch_size=8, seed=0, shard_index=0, shard_count=1)


def test_decode_and_to_pil():
  buf = io.BytesIO()
  Image.new("L", (5, 4), 7).save(buf, format="PNG")
  array = transforms.decode(buf.getvalue())
  assert array.shape == (4, 5, 3) and array.dtype == np.uint8
  assert transforms.to_pil(buf.getvalue()).size == (5, 4)
  with pytest.raises(Exception):
    transforms.decode(b"garbage")


def test_tokenizer_of_the_dataset_is_cached_with_it(cfg):
  path = builders.tokenizer_path(builders.prepare("shapes", cfg.data_dir, image_size=32,
                                                  **cfg.builder_kwargs))
  assert tokenizer.load_tokenizer(path).eos_id == tokenizer.EOS_ID
