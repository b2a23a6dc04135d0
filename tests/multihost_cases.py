"""The multi-process matrix's runs: every Task, tiny, on the three meshes.

Run as one process (8 devices) or as several (launch/multiprocess_local.sh),
with the same arguments; each case trains a few steps (evaluating and
checkpointing), then restores its checkpoint on the same processes
(restored.json) and, for EVALUATED, runs `loop.evaluate` on it (eval.json):

  MMJAX_MODULE=tests.multihost_cases launch/multiprocess_local.sh 2 4 \\
      --out=DIR --data_dir=DATA --cases=clip_softmax,lm

tests/test_multiprocess.py compares the runs of 2 processes x 4 devices with
those of 1 process x 8 devices.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

MESHES = {
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data4_tensor2": {"data": 4, "fsdp": 1, "tensor": 2},
}

# case -> (family, overrides of that family's tiny config, mesh). Every mesh and
# every Task appears at least once; CLIP in its four loss forms.
CASES = {
    "clip_softmax": ("clip", {}, "data2_fsdp4"),
    "clip_softmax_chunked": ("clip", {"model.chunked_loss": True}, "data4_tensor2"),
    "siglip": ("clip", {"model.loss": "sigmoid"}, "fsdp8"),
    "siglip_chunked": ("clip", {"model.loss": "sigmoid", "model.chunked_loss": True},
                       "data2_fsdp4"),
    "vit": ("vit", {}, "data4_tensor2"),
    "mae": ("mae", {}, "fsdp8"),
    "lm": ("lm", {}, "data2_fsdp4"),
    "llava_stage2": ("llava", {}, "data4_tensor2"),
}

STEPS = 4
# Cases whose checkpoint mmjax.evaluate also restores and evaluates on the same
# processes (eval.json); every case's restores there for restored.json.
EVALUATED = ("clip_softmax", "llava_stage2")
LLAVA_ARGS = "runlocal=true,llm=tiny,num_train=48,num_eval=6,image_size=32"


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _set(config, key: str, value) -> None:
  *parents, last = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.unlocked():
    node[last] = value


def family_config(family: str, data_dir: str):
  """The tiny config of a Task family, its data under `data_dir`."""
  if family == "clip":
    from experiments import clip_shapes
    c = clip_shapes.get_config("runlocal=true")
    overrides = {"model.vision.variant": "tiny/8", "model.text.size": "tiny",
                 "model.embed_dim": 16, "data.builder_kwargs.num_train": 160,
                 "data.builder_kwargs.num_validation": 40, "data.builder_kwargs.num_test": 40}
  elif family in ("vit", "mae"):
    from experiments import mae_digits, vit_digits
    c = (vit_digits if family == "vit" else mae_digits).get_config("runlocal=true")
    overrides = {"data.image_size": 16, "model.vision.variant": "tiny/4"}
    if family == "mae":
      overrides.update({"model.mae.decoder_width": 16, "model.mae.decoder_depth": 1,
                        "model.mae.decoder_heads": 2, "model.mae.decoder_mlp_dim": 32})
  elif family == "lm":
    from experiments import lm_shapes
    c = lm_shapes.get_config(f"{LLAVA_ARGS},data={os.path.join(data_dir, 'instruct')}")
    overrides = {}
  elif family == "llava":
    from experiments import llava_shapes
    c = llava_shapes.get_config(
        f"{LLAVA_ARGS},vision=tiny,stage=2,data={os.path.join(data_dir, 'instruct')}")
    overrides = {"eval.max_new_tokens": 4}
  else:
    raise ValueError(f"unknown family {family!r}")
  if family in ("clip", "vit", "mae"):
    overrides["data.data_dir"] = os.path.join(data_dir, "tfds")
  overrides.update({"total_steps": STEPS, "log_every": 1, "eval_every": STEPS,
                    "checkpoint_every": STEPS, "batch_size": 16, "eval.batch_size": 16,
                    "data_shards": 8})
  for key, value in overrides.items():
    _set(c, key, value)
  return c


def case_config(case: str, data_dir: str):
  family, overrides, mesh = CASES[case]
  c = family_config(family, data_dir)
  for key, value in overrides.items():
    _set(c, key, value)
  _set(c, "mesh.preset", "")
  for axis, size in MESHES[mesh].items():
    _set(c, f"mesh.{axis}", size)
  return c


_OUT = flags.DEFINE_string("out", None, "a workdir per case is made under it")
_DATA = flags.DEFINE_string("data_dir", None, "the prepared data (see family_config)")
_CASES = flags.DEFINE_list("cases", list(CASES), "which cases")


def main(argv):
  del argv
  from mmjax import cli
  cli.init_process()
  from mmjax.train import loop
  for case in _CASES.value:
    config = case_config(case, _DATA.value)
    workdir = os.path.join(_OUT.value, case)
    loop.train(config, workdir)
    write_restored(config, workdir)
    if case in EVALUATED:
      loop.evaluate(config, workdir)


def write_restored(config, workdir: str) -> None:
  """Restores the latest checkpoint on these processes; process 0 writes the
  step and each param's sum of squares to workdir/restored.json."""
  import jax
  import jax.numpy as jnp
  from mmjax import treeutil
  from mmjax.train import loop
  s = loop.setup(config, workdir)
  step = s["ckpt"].latest_step()
  state, _ = s["ckpt"].restore(loop.restore_target(s["abstract"], s["shardings"]), step)
  s["ckpt"].close()
  norms = jax.jit(lambda p: jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))),
                                         p))(state.params)
  flat = {treeutil.path_str(path): float(v.addressable_data(0))
          for path, v in jax.tree_util.tree_flatten_with_path(norms)[0]}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "restored.json"), "w") as f:
      json.dump({"step": int(step), "sum_of_squares": flat}, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["out", "data_dir"])
  app.run(main)
