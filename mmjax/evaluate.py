"""python -m mmjax.evaluate --config=... --workdir=DIR: latest checkpoint -> DIR/eval.json"""

import json

from mmjax import cli
from mmjax.train import loop

_CONFIG, _WORKDIR = cli.experiment_flags("the training run's workdir")

if __name__ == "__main__":
  cli.run(lambda: print(json.dumps(loop.evaluate(_CONFIG.value, _WORKDIR.value), indent=2)))
