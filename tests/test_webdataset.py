"""Webdataset shards as a grain source: brace patterns, the cached index of
member offsets, local and fsspec URLs, samples that cannot be used skipped and
counted, unreadable shards named, and the train pipeline over them (shuffled,
split between processes, resumed exactly)."""

import io
import json
import os

import fsspec
import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline, webdataset


def _png(color, size=16) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _samples(n, start=0):
  for i in range(start, start + n):
    yield f"{i:06d}", {"png": _png(i * 7 % 256), "txt": f"a photo of thing {i}".encode(),
                       "json": json.dumps({"label": i % 3}).encode()}


def test_brace_patterns_expand_as_webdataset_writes_them():
  assert webdataset.expand_urls("d/{000..003}.tar") == [f"d/{i:03d}.tar" for i in range(4)]
  assert webdataset.expand_urls("gs://b/{8..11}.tar") == [f"gs://b/{i}.tar" for i in (8, 9, 10, 11)]
  assert webdataset.expand_urls("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
  assert webdataset.expand_urls("x.tar::y/{1..2}.tar") == ["x.tar", "y/1.tar", "y/2.tar"]
  with pytest.raises(ValueError, match="backwards"):
    webdataset.expand_urls("{5..2}.tar")


def test_member_names_group_into_samples_by_key():
  assert webdataset.sample_key("a/b/00042.jpg") == ("a/b/00042", "jpg")
  assert webdataset.sample_key("00042.seg.PNG") == ("00042", "seg.png")
  assert webdataset.sample_key("README") is None


def test_the_source_reads_every_sample_through_a_cached_index(tmp_path):
  paths = webdataset.write_shards(_samples(10), str(tmp_path / "wds"), samples_per_shard=4)
  assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
  cache = tmp_path / "cache"
  src = webdataset.WebDatasetSource(str(tmp_path / "wds" / "{00000..00002}.tar"),
                                    cache_dir=str(cache), label_key="json:label")
  assert len(src) == 10 and len(list(cache.iterdir())) == 3
  ex = src[9]
  assert ex["id"] == "000009" and ex["captions"] == ["a photo of thing 9"] and not ex["bad"]
  assert ex["image"].shape == (16, 16, 3) and (ex["image"] == 9 * 7 % 256).all()
  assert ex["label"] == 0
  # the index is read back, not rebuilt: a shard that changes size is indexed anew
  again = webdataset.WebDatasetSource(paths, cache_dir=str(cache))
  assert again._keys == src._keys and len(list(cache.iterdir())) == 3
  webdataset.write_shards(_samples(5), str(tmp_path / "wds"), samples_per_shard=5)
  assert len(webdataset.WebDatasetSource(paths, cache_dir=str(cache))) == 5 + 4 + 2


def test_unusable_samples_are_skipped_and_counted_and_bad_shards_named(tmp_path):
  bad = [("good", {"png": _png(1), "txt": b"fine"}),
         ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"broken"}),
         ("uncaptioned", {"png": _png(2)}),
         ("imageless", {"txt": b"words only"})]
  [path] = webdataset.write_shards(iter(bad), str(tmp_path))
  src = webdataset.WebDatasetSource(path, cache_dir=str(tmp_path / "c"))
  got = {ex["id"]: ex["bad"] for ex in (src[i] for i in range(len(src)))}
  assert got == {"good": False, "corrupt": True, "uncaptioned": True, "imageless": True}
  assert src.num_bad == 3
  (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
  with pytest.raises(ValueError, match="junk.tar cannot be read as a tar file"):
    webdataset.WebDatasetSource(str(tmp_path / "junk.tar"), cache_dir=str(tmp_path / "c"))
  with pytest.raises(FileNotFoundError):
    webdataset.WebDatasetSource(str(tmp_path / "missing.tar"), cache_dir=str(tmp_path / "c"))


def test_fsspec_urls_are_read_like_local_files(tmp_path):
  [local] = webdataset.write_shards(_samples(3), str(tmp_path))
  fs = fsspec.filesystem("memory")
  with open(local, "rb") as f:
    fs.pipe("/wds/00000.tar", f.read())
  src = webdataset.WebDatasetSource("memory://wds/{00000..00000}.tar",
                                    cache_dir=str(tmp_path / "c"))
  assert len(src) == 3 and src[2]["captions"] == ["a photo of thing 2"]
  assert (src[1]["image"] == 7).all()


def test_the_train_pipeline_reads_shards_resumes_exactly_and_splits_processes(tmp_path):
  webdataset.write_shards(_samples(24), str(tmp_path / "wds"), samples_per_shard=8)
  cfg = pipeline.default_data_config("webdataset")
  cfg.urls = str(tmp_path / "wds" / "{00000..00002}.tar")
  cfg.image_size, cfg.context_length, cfg.tokenizer = 16, 8, None

  class Tok:
    def encode_batch(self, texts, length):
      return np.array([[len(t)] + [0] * (length - 1) for t in texts], np.int32)

  os.environ["MMJAX_WDS_CACHE"] = str(tmp_path / "cache")
  try:
    it = pipeline.train_iterator(cfg, tokenizer=Tok(), batch_size=4, seed=0)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    resumed = pipeline.train_iterator(cfg, tokenizer=Tok(), batch_size=4, seed=0)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(3)]):
      np.testing.assert_array_equal(a["image"], b["image"])
    assert first[0]["image"].shape == (4, 16, 16, 3) and first[0]["text"].shape == (4, 8)
    # two processes read disjoint halves of the samples: one epoch of each is 12
    cfg.return_index = True
    seen = []
    for shard in (0, 1):
      part = pipeline.train_iterator(cfg, tokenizer=Tok(), batch_size=4, seed=0,
                                     shard_index=shard, shard_count=2)
      seen.append([int(i) for _ in range(3) for i in next(part)["index"]])
  finally:
    del os.environ["MMJAX_WDS_CACHE"]
  assert sorted(seen[0] + seen[1]) == list(range(24))
  with pytest.raises(ValueError, match="set data.eval_urls"):
    pipeline.make_source(cfg, "validation")


@pytest.mark.slow
def test_clip_trains_on_shards_written_from_the_scenes_and_counts_what_it_skips(tmp_path):
  """The scenes written as shards (png, txt, json with all captions), plus a
  corrupt JPEG and a sample without a caption: CLIP trains on, and the loop
  logs both as data/skipped."""
  import multihost_cases
  from mmjax.train import loop, tasks
  config = multihost_cases.family_config("clip", str(tmp_path / "tfds"))
  tasks.build_task(config)  # prepares the scenes and their tokenizer
  tokenizer = pipeline.tokenizer_file(config.data)
  source = pipeline.make_source(config.data, "train")
  broken = [("corrupt", {"jpg": b"\xff\xd8\xff\xe0" + b"\0" * 64, "txt": b"a red circle"}),
            ("uncaptioned", {"png": webdataset.encode_png(source[0]["image"])})]
  samples = list(webdataset.source_samples(source, progress=False))
  paths = webdataset.write_shards(iter(samples[:60] + broken + samples[60:]),
                                  str(tmp_path / "wds"), samples_per_shard=50)
  assert len(paths) == 4
  data = pipeline.default_data_config("webdataset")
  data.update(urls=str(tmp_path / "wds" / "{00000..00003}.tar"), text_key="json:captions",
              tokenizer=tokenizer, image_size=config.data.image_size,
              context_length=config.data.context_length)
  config.data = data
  config.update(total_steps=24, log_every=12, eval_every=0, checkpoint_every=24)
  os.environ["MMJAX_WDS_CACHE"] = str(tmp_path / "cache")
  try:
    last = loop.train(config, str(tmp_path / "run"))
  finally:
    del os.environ["MMJAX_WDS_CACHE"]
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [12, 24] and np.isfinite(last["train/loss"])
  # 24 steps of 16 cover the 162 samples twice: each broken one is met at least once
  assert rows[-1]["data/skipped"] >= 2


def test_the_command_line_writes_shards_from_pairs_and_from_a_dataset(tmp_path, capsys):
  from mmjax.data import __main__ as cli
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
  (tmp_path / "pairs.jsonl").write_text(
      "".join(json.dumps({"image": f"im{i}.png", "caption": f"grey {i}"}) + "\n"
              for i in range(3)))
  cli.main(["webdataset", f"--src={tmp_path / 'pairs.jsonl'}", f"--out={tmp_path / 'a'}",
            "--samples_per_shard=2"])
  assert "wrote 2 shards" in capsys.readouterr().out
  src = webdataset.WebDatasetSource(str(tmp_path / "a" / "{00000..00001}.tar"),
                                    cache_dir=str(tmp_path / "c"))
  assert [src[i]["captions"] for i in range(3)] == [["grey 0"], ["grey 1"], ["grey 2"]]
  (tmp_path / "bad.csv").write_text("file,caption\nim0.png,x\n")
  with pytest.raises(ValueError, match=r"bad.csv, row 1: needs an image path"):
    cli.main(["webdataset", f"--src={tmp_path / 'bad.csv'}", f"--out={tmp_path / 'b'}"])
  # a split of an embedded dataset, every caption kept in the sample's JSON
  cli.main(["shapes", f"--data_dir={tmp_path / 'tfds'}", "num_train=12", "num_validation=4",
            "num_test=4", "image_size=16"])
  cli.main(["webdataset", "--src=shapes:test", f"--out={tmp_path / 's'}",
            f"--data_dir={tmp_path / 'tfds'}", "num_train=12", "num_validation=4",
            "num_test=4", "image_size=16"])
  shapes = webdataset.WebDatasetSource(str(tmp_path / "s" / "00000.tar"), text_key="json:captions",
                                       label_key="json:label", cache_dir=str(tmp_path / "c"))
  assert len(shapes) == 4 and len(shapes[0]["captions"]) > 1 and shapes[0]["label"] >= 0
  assert shapes[0]["image"].shape == (16, 16, 3)


def test_shards_of_the_scenes_give_the_batches_of_the_tfds_source(tmp_path):
  """Written as shards (lossless PNG, every caption in the JSON) and read back,
  the scenes give the train batches that TFDS gives, image for image and token
  for token: a run from shards is the run from TFDS."""
  from experiments import clip_shapes
  from mmjax.data import __main__ as cli
  settings = ["num_train=40", "num_validation=4", "num_test=8", "image_size=16"]
  tfds_dir = str(tmp_path / "tfds")
  cli.main(["shapes", f"--data_dir={tfds_dir}", *settings])
  for split in ("train", "test"):
    cli.main(["webdataset", f"--src=shapes:{split}", f"--out={tmp_path / 'wds' / split}",
              f"--data_dir={tfds_dir}", *settings])
  scenes = pipeline.default_data_config("shapes")
  scenes.data_dir, scenes.image_size = tfds_dir, 16
  scenes.builder_kwargs.update(num_train=40, num_validation=4, num_test=8)
  shards = clip_shapes.webdataset_data(f"webdataset:{tmp_path / 'wds'}", scenes)
  os.environ["MMJAX_WDS_CACHE"] = str(tmp_path / "cache")
  try:
    tok = pipeline.dataset_tokenizer(scenes)
    a = pipeline.train_iterator(scenes, tokenizer=tok, batch_size=8, seed=3)
    b = pipeline.train_iterator(shards, tokenizer=pipeline.dataset_tokenizer(shards),
                                batch_size=8, seed=3)
    for _ in range(6):  # past one epoch of 40
      x, y = next(a), next(b)
      for key in ("image", "text", "label"):
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert pipeline.class_names(shards) == pipeline.class_names(scenes)
    assert pipeline.held_out_labels(shards) == pipeline.held_out_labels(scenes)
    test = pipeline.make_source(shards, "test")
    assert [test[i]["num_objects"] for i in range(8)] == [
        pipeline.make_source(scenes, "test")[i]["num_objects"] for i in range(8)]
  finally:
    del os.environ["MMJAX_WDS_CACHE"]
