"""python -m mmjax.train --config=experiments/NAME.py[:ARGS] --workdir=DIR [--config.KEY=VALUE ...]"""

from mmjax import cli
from mmjax.train import loop

_CONFIG, _WORKDIR = cli.experiment_flags("where checkpoints and metrics go")

if __name__ == "__main__":
  cli.run(lambda: loop.train(_CONFIG.value, _WORKDIR.value))
