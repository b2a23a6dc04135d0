"""mmjax workdirs as written by `mmjax.train` and `mmjax.convert`: config.json plus
Orbax checkpoints (checkpoints/<step>/state, a TrainState of step, params,
opt_state, rng).

A converted workdir holds step 0 with an empty optimizer state; readers restore
only `params` (an Orbax partial restore), so the same code reads a training run
(whose opt_state is whatever its optimizer made) and a converted checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import checkpoint

CONFIG_NAME = "config.json"
HF_CONFIG_NAME = "hf_config.json"  # the imported HF config, the base of an export
TOKENIZER_DIR = "tokenizer"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no {CONFIG_NAME}: not an mmjax workdir (written by "
                            f"`python -m mmjax.train` or `python -m mmjax.convert`)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def use_local_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A converted workdir that was moved: point data.tokenizer at its own tokenizer/ folder."""
  path = config.data.get("tokenizer")
  local = os.path.join(workdir, TOKENIZER_DIR)
  if path and not os.path.exists(path) and os.path.isdir(local):
    for name in ("tokenizer.model", "tokenizer.json"):
      if os.path.exists(os.path.join(local, name)):
        config.data.tokenizer = os.path.join(local, name)
        return


def save(workdir: str, config: ml_collections.ConfigDict, params: Any, seed: int = 0) -> None:
  """Writes config.json and checkpoint 0 (params, no optimizer state)."""
  from mmjax.train.step import TrainState
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; convert into an empty folder")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_NAME), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={},
                     rng=jax.random.PRNGKey(seed))
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=1, async_save=False)
  ckpt.save(0, state, force=True)
  ckpt.close()


def restore_params(workdir: str, abstract: Any, step: int | None = None) -> Any:
  """The params of checkpoint `step` (default: the latest), onto the shardings of
  `abstract` (ShapeDtypeStructs; without a sharding, the first device). A
  mismatch with the model raises CheckpointMismatchError naming the params."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)
                                     or device), abstract)
  return checkpoint.restore_subtree(workdir, ("params",), target, step)
