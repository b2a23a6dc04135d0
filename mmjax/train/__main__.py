"""python -m mmjax.train --config=experiments/NAME.py[:ARGS] --workdir=DIR [--config.KEY=VALUE ...]"""

from absl import app, flags
from ml_collections import config_flags

from mmjax import cli
from mmjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.init_process()
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
