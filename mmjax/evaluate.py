"""python -m mmjax.evaluate --config=... --workdir=DIR: latest checkpoint -> DIR/eval.json"""

import json

from absl import app, flags
from ml_collections import config_flags

from mmjax import cli
from mmjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's workdir")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.init_process()
  print(json.dumps(loop.evaluate(_CONFIG.value, _WORKDIR.value), indent=2))


if __name__ == "__main__":
  app.run(main)
