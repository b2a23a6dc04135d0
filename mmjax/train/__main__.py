"""python -m mmjax.train --config=experiments/NAME.py[:ARGS] --workdir=DIR [--config.KEY=VALUE ...]"""

if __name__ == "__main__":
  from mmjax import hostenv
  hostenv.reexec_with_tuned_malloc()  # before JAX starts: keeps each step's memory (hostenv.py)

from mmjax import cli  # noqa: E402
from mmjax.train import loop  # noqa: E402

_CONFIG, _WORKDIR = cli.experiment_flags("where checkpoints and metrics go")

if __name__ == "__main__":
  cli.run(lambda: loop.train(_CONFIG.value, _WORKDIR.value))
