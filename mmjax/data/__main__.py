"""Prepare a dataset ahead of a run (e.g. once per shared disk).

  python -m mmjax.data shapes [--data_dir=DIR] [num_train=2000 image_size=32 ...]
  python -m mmjax.data webdataset --src=shapes[:SPLIT] --out=DIR [--samples_per_shard=N] [KEY=VALUE]
  python -m mmjax.data webdataset --src=pairs.csv|pairs.jsonl --out=DIR

The second form writes img2dataset-layout tar shards (NNNNNNNNN.png or the
image's own extension, .txt, .json) from a dataset mmjax reads (a split of the
embedded datasets or of a prepared TFDS dataset), or from a CSV / JSONL of
image path and caption (columns or keys `path`/`image` and `caption`/`text`,
paths relative to the file); a split of an embedded dataset also gets its
tokenizer (tokenizer.model) beside the shards. Train on them with
`--config.data.name=webdataset --config.data.urls='DIR/{00000..000NN}.tar'`.
"""

import argparse
import csv
import dataclasses
import json
import os
import shutil

from mmjax.data import builders


def _settings(name: str, items: list[str]) -> dict:
  """KEY=VALUE builder settings of an embedded dataset, typed by their defaults."""
  config = builders.builder_config(name)
  kinds = {f.name: type(getattr(config, f.name)) for f in dataclasses.fields(config)}
  kwargs = {}
  for item in items:
    key, _, value = item.partition("=")
    kwargs[key] = kinds.get(key, str)(value)
  return kwargs


def _prepare(argv):
  parser = argparse.ArgumentParser(prog="python -m mmjax.data", description=__doc__.split("\n")[0])
  parser.add_argument("name", choices=builders.EMBEDDED)
  parser.add_argument("--data_dir", default=None, help="default: $MMJAX_DATA_DIR or ~/.cache")
  parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                      help="builder settings, e.g. num_train=2000 image_size=32")
  args = parser.parse_intermixed_args(argv)
  builder = builders.prepare(args.name, args.data_dir, **_settings(args.name, args.settings))
  print(f"{args.name}: {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} examples")


def _pairs(path: str):
  """(key, fields) of a CSV / JSONL of image paths and captions."""
  from tqdm import tqdm
  with open(path, encoding="utf-8") as f:
    rows = (list(csv.DictReader(f)) if path.endswith(".csv")
            else [json.loads(line) for line in f if line.strip()])
  root = os.path.dirname(os.path.abspath(path))
  for i, row in enumerate(tqdm(rows, desc="writing shards", unit="pair")):
    image = row.get("path") or row.get("image")
    caption = row.get("caption") or row.get("text")
    if not image or caption is None:
      raise ValueError(f"{path}, row {i + 1}: needs an image path (`path` or `image`) and a "
                       f"caption (`caption` or `text`); it has {sorted(row)}")
    with open(os.path.join(root, image), "rb") as f:
      data = f.read()
    ext = os.path.splitext(image)[1].lstrip(".").lower() or "jpg"
    yield f"{i:09d}", {ext: data, "txt": str(caption).encode()}


def _webdataset(argv):
  from mmjax.data import pipeline, webdataset
  parser = argparse.ArgumentParser(prog="python -m mmjax.data webdataset")
  parser.add_argument("--src", required=True,
                      help="a dataset (shapes, a TFDS name) with :SPLIT, or a .csv / .jsonl")
  parser.add_argument("--out", required=True, help="folder for the shards")
  parser.add_argument("--data_dir", default=None, help="where the dataset is prepared")
  parser.add_argument("--samples_per_shard", type=int, default=10000)
  parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                      help="an embedded dataset's builder settings, as it was prepared")
  args = parser.parse_intermixed_args(argv)
  if args.src.endswith((".csv", ".jsonl")):
    samples = _pairs(args.src)
  else:
    name, _, split = args.src.partition(":")
    cfg = pipeline.default_data_config(name)
    cfg.data_dir = args.data_dir
    if args.settings:
      kwargs = _settings(name, args.settings)
      cfg.image_size = kwargs.get("image_size", cfg.image_size)
      cfg.builder_kwargs.update(kwargs)
    samples = webdataset.source_samples(pipeline.make_source(cfg, split or cfg.train_split))
    if name in builders.EMBEDDED:  # its tokenizer travels with the shards
      os.makedirs(args.out, exist_ok=True)
      shutil.copy(pipeline.tokenizer_file(cfg), os.path.join(args.out, builders.TOKENIZER_FILE))
  paths = webdataset.write_shards(samples, args.out, samples_per_shard=args.samples_per_shard)
  last = len(paths) - 1
  print(f"wrote {len(paths)} shards: {os.path.join(args.out, f'{{00000..{last:05d}}}.tar')}")


def main(argv=None):
  import sys
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "webdataset":
    return _webdataset(argv[1:])
  return _prepare(argv)


if __name__ == "__main__":
  main()
