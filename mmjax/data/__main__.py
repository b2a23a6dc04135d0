"""Prepare an embedded dataset ahead of a run (e.g. once per shared disk).

  python -m mmjax.data shapes [--data_dir=DIR] [num_train=2000 image_size=32 ...]
"""

import argparse
import dataclasses

from mmjax.data import builders


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m mmjax.data", description=__doc__.split("\n")[0])
  parser.add_argument("name", choices=builders.EMBEDDED)
  parser.add_argument("--data_dir", default=None, help="default: $MMJAX_DATA_DIR or ~/.cache")
  parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                      help="builder settings, e.g. num_train=2000 image_size=32")
  args = parser.parse_intermixed_args(argv)
  config = builders.builder_config(args.name)
  kinds = {f.name: type(getattr(config, f.name)) for f in dataclasses.fields(config)}
  kwargs = {}
  for item in args.settings:
    key, _, value = item.partition("=")
    kwargs[key] = kinds.get(key, str)(value)
  builder = builders.prepare(args.name, args.data_dir, **kwargs)
  print(f"{args.name}: {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} examples")


if __name__ == "__main__":
  main()
