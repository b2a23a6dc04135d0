"""A small ConvNet on sklearn's digits: the teacher for DeiT-style distillation.

  python -m mmjax.train --config=experiments/convnet_digits.py --workdir=runs/convnet_digits
  python -m mmjax.train --config=experiments/vit_digits.py:teacher=runs/convnet_digits ...
  :labels=0.1   the teacher sees the same 10% of the labels as its student
"""

import ml_collections

from experiments import common
from experiments.vit_digits import classification_loss
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, image_size=32, steps=300, batch=128, width=16,
                       labels=1.0, smoothing=0.1, lr=3e-3, crop=False)
  c = common.base_config("convnet")
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 100
  c.optim.lr = a.lr
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.05
  c.model = convnet_model(a.width, num_classes=10)
  c.loss = classification_loss(a.smoothing)
  c.data = default_data_config("digits")
  c.data.image_size = a.image_size
  c.data.label_fraction = a.labels
  c.data.transforms.random_resized_crop = a.crop
  c.data.transforms.crop_scale = (0.7, 1.0)
  c.eval.batch_size = 128
  if a.runlocal:
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 20, 10
    c.batch_size = 32
  return c


def convnet_model(width: int = 16, *, num_classes: int):
  """Three stages of width, 2 width, 4 width channels (ConvNetConfig keys)."""
  return ml_collections.ConfigDict({"channels": (width, 2 * width, 4 * width),
                                    "convs_per_stage": 2, "groups": 8,
                                    "num_classes": num_classes, "dtype": "float32"})
