"""CLIP on sklearn's digits (8x8, upsampled): zero-shot "a photo of the digit seven".

  python -m mmjax.train --config=experiments/clip_digits.py --workdir=runs/clip_digits
"""

from experiments import common
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, steps=600, vision="nano", patch=4, text="nano")
  c = common.base_config("clip")
  c.init = common.clip_init()
  c.total_steps = a.steps
  c.batch_size = 128
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint_every = 200
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.model = common.clip_model(f"{a.vision}/{a.patch}", a.text, 64)
  c.data = default_data_config("digits")
  c.eval.batch_size = 128
  if a.runlocal:
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 20, 10
    c.batch_size = 32
  return c
