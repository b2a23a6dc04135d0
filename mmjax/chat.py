"""Ask a trained LLaVA about an image.

  python -m mmjax.chat --workdir=DIR --image=PATH "What color is the circle?"
  python -m mmjax.chat --workdir=DIR --image=PATH        # interactive, multi-turn

The workdir's config.json rebuilds the model and its latest checkpoint's params
are loaded (no optimizer state). Greedy by default; --temperature and --top_p
sample.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a LLaVA (stage 2) workdir")
_IMAGE = flags.DEFINE_string("image", None, "image file")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "longest answer in tokens")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")

_LOADED: dict[str, Any] = {}


def load(workdir: str):
  """(task, params) of the workdir's latest checkpoint, cached per workdir."""
  if workdir in _LOADED:
    return _LOADED[workdir]
  import jax
  import ml_collections
  from mmjax import checkpoint, parallel
  from mmjax.train import tasks
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir}: is it a training workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.task != "llava":
    raise ValueError(f"{workdir} trained task {config.task!r}; chat needs a 'llava' workdir")
  task = tasks.build_task(config)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.get("rules"))
  boxed = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0)))
  shardings = parallel.shardings_for(boxed, mesh, rules)
  import flax.linen as nn
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)
  params = checkpoint.restore_subtree(workdir, ("params",), target)
  _LOADED[workdir] = (task, params, mesh, rules)
  return _LOADED[workdir]


def reply(workdir: str, image_path: str, conversation: list[dict], **kwargs) -> str:
  """The assistant's answer to a conversation whose last turn is the user's."""
  import numpy as np
  from mmjax import parallel
  from mmjax.data import transforms
  task, params, mesh, rules = load(workdir)
  cfg = task.data_cfg
  image = transforms.preprocess_image(image_path, cfg.image_size, cfg.transforms.normalize,
                                      pad_square=bool(cfg.transforms.pad_to_square))
  with parallel.activate(mesh, rules):
    return task.answer(params, np.asarray(image)[None], [conversation], mesh=mesh,
                       **kwargs)[0].strip()


def answer_once(workdir: str, image_path: str, question: str, **kwargs) -> str:
  return reply(workdir, image_path,
               [{"from": "human", "value": "<image>\n" + question}], **kwargs)


def main(argv):
  from mmjax import cli
  cli.init_process()
  if not _WORKDIR.value or not _IMAGE.value:
    raise app.UsageError("--workdir and --image are required")
  if not os.path.exists(_IMAGE.value):
    raise app.UsageError(f"image not found: {_IMAGE.value}")
  kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                top_p=_TOP_P.value, seed=_SEED.value)
  if len(argv) > 1:
    print(answer_once(_WORKDIR.value, _IMAGE.value, " ".join(argv[1:]), **kwargs))
    return
  print("Ask about the image (empty line or Ctrl-D quits, /reset starts over).")
  conversation: list[dict] = []
  while True:
    try:
      question = input("USER: ").strip()
    except EOFError:
      break
    if not question:
      break
    if question == "/reset":
      conversation = []
      continue
    prefix = "" if conversation else "<image>\n"
    conversation.append({"from": "human", "value": prefix + question})
    answer = reply(_WORKDIR.value, _IMAGE.value, conversation, **kwargs)
    print(f"ASSISTANT: {answer}")
    conversation.append({"from": "gpt", "value": answer})


if __name__ == "__main__":
  app.run(main)
