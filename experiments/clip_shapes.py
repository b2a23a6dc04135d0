"""CLIP on the embedded synthetic scenes: the README's main job (CPU, minutes).

  python -m mmjax.train --config=experiments/clip_shapes.py --workdir=runs/clip_shapes
  --config=experiments/clip_shapes.py:runlocal=true   a 20-step smoke run
  --config=experiments/clip_shapes.py:data=webdataset:DIR   the same scenes read from
      webdataset shards in DIR/train and DIR/test, as written by
      `python -m mmjax.data webdataset --src=shapes:train --out=DIR/train single_fraction=1.0`
      (and `--src=shapes:test --out=DIR/test`)
"""

import os

from experiments import common
from mmjax.data import shapes
from mmjax.data.pipeline import default_data_config


# The vision tower (and image size): experiments/llava_shapes.py builds the
# same one to read a CLIP run of this config.
TOWER = dict(vision="nano", patch=8, image_size=64, stem="conv", pool="map")


def get_config(arg=None):
  # single: the share of single-object scenes. All of them (1.0) teaches the
  # colour-shape pairs 3x sooner than half (0.5: 0.442 at step 500, 0.919 at
  # 1500); LLaVA's tower is trained on a mix (launch/llava_shapes.sh).
  a = common.parse_arg(arg, runlocal=False, steps=700, text="nano", single=1.0, lr=2e-3,
                       data="", **TOWER)
  c = common.base_config("clip")
  c.init = common.clip_init()
  c.total_steps = a.steps
  c.batch_size = 128
  c.log_every = 25
  c.eval_every = 250
  c.checkpoint_every = 250
  c.optim.lr = a.lr
  c.optim.warmup_steps = 100
  # Held, not annealed: the pairs are learnt late (0.55 at step 250, 0.87 at
  # 500, 0.98 at 700), and a cosine decay over 500 steps stopped at 0.83.
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.05
  c.model = common.clip_model(f"{a.vision}/{a.patch}", a.text, 64)
  c.model.vision.stem = a.stem
  # Attention pooling (a learned probe) finds the objects among background
  # tokens much sooner than a class token does.
  c.model.vision.pool = a.pool
  c.model.vision.num_prefix_tokens = int(a.pool == "cls")
  c.data = default_data_config("shapes")
  c.data.image_size = a.image_size
  c.data.builder_kwargs.single_fraction = a.single
  c.data.eval_split = "test"  # held-out compositions are scored here
  if a.data:
    c.data = webdataset_data(a.data, c.data)
  c.eval.batch_size = 256
  if a.runlocal:
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 20, 10
    c.batch_size = 32
    c.data.image_size, c.model.vision.stem = 32, "linear"
    c.data.builder_kwargs.num_train = 512
    c.data.builder_kwargs.num_validation = 128
    c.data.builder_kwargs.num_test = 128
  return c


def webdataset_data(spec: str, scenes):
  """The data config that reads `scenes` (a shapes data config) from the shards
  in DIR/train and DIR/test of `spec` = "webdataset:DIR": every caption (json),
  the label, the scenes' tokenizer, class names, prompts and held-out pairs."""
  kind, _, root = spec.partition(":")
  if kind != "webdataset" or not root:
    raise ValueError(f"clip_shapes.py: data={spec!r}; expected data=webdataset:DIR")
  d = default_data_config("webdataset")
  d.update(urls=os.path.join(root, "train"), eval_urls=os.path.join(root, "test"),
           text_key="json:captions", label_key="json:label", eval_split="test",
           tokenizer=os.path.join(root, "train", "tokenizer.model"),
           image_size=scenes.image_size, context_length=scenes.context_length,
           class_names=shapes.class_names(), prompt_templates=list(shapes.PROMPT_TEMPLATES),
           held_out_labels=shapes.held_out_labels(
               scenes.builder_kwargs.get("held_out_fraction", 0.15)))
  d.transforms = scenes.transforms
  return d
