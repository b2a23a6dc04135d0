"""A ViT classifier on the embedded shapes: colour x shape of the largest object
(the `label` feature, 48 classes).

  python -m mmjax.train --config=experiments/vit_shapes.py --workdir=runs/vit_shapes
  :stem=conv  hybrid stem    :mixup=0.8,cutmix=1.0    :runlocal=true  a smoke run

Unlike CLIP's zero-shot setting, no colour-shape pair is held out of train
(held_out_fraction 0): a classifier cannot name a class it never saw.
"""

import ml_collections

from experiments import common
from experiments.vit_digits import classification_loss, distill, vit_model
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, steps=2000, batch=128, image_size=64, variant="nano",
                       patch=8, pool="cls", stem="linear", labels=1.0, teacher=None, mae=None,
                       smoothing=0.1, mixup=0.0, cutmix=0.0, lr=2e-3)
  c = common.base_config("vit")
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.log_every = 25
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optim.lr = a.lr
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.05
  c.model = vit_model(f"{a.variant}/{a.patch}", a.pool, a.stem, num_classes=48)
  c.loss = classification_loss(a.smoothing, a.mixup, a.cutmix)
  c.distill = distill(a.teacher)
  c.init = ml_collections.ConfigDict({"mae_workdir": ml_collections.FieldReference(a.mae, str)})
  c.data = default_data_config("shapes")
  c.data.image_size = a.image_size
  c.data.builder_kwargs.held_out_fraction = 0.0
  c.data.eval_split = "validation"
  c.data.label_fraction = a.labels
  c.eval.batch_size = 250
  if a.runlocal:
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 20, 10
    c.batch_size = 32
    c.data.image_size = 32
    c.data.builder_kwargs.num_train = 512
    c.data.builder_kwargs.num_validation = 128
    c.data.builder_kwargs.num_test = 128
  return c
