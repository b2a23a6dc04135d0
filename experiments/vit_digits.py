"""A ViT classifier on sklearn's digits (8x8, upsampled to 32 px), from scratch or
with the remedies for its data hunger:

  python -m mmjax.train --config=experiments/vit_digits.py --workdir=runs/vit_digits
  :stem=conv                          hybrid stem (conv layers down to the patch grid)
  :teacher=runs/convnet_digits        DeiT hard-label distillation (convnet_digits.py)
  :labels=0.1,teacher=...,unlabelled=true   ...also on the images without labels
  :mae=runs/mae_digits                fine-tune the encoder of an MAE run (mae_digits.py)
  :labels=0.1                         train on a fixed 10% of the train labels
  :runlocal=true                      a 20-step smoke run
"""

import ml_collections

from experiments import common
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, image_size=32, steps=600, batch=128, variant="nano",
                       patch=8, pool="cls", stem="linear", labels=1.0, teacher=None,
                       unlabelled=False, mae=None, smoothing=0.1, mixup=0.0, cutmix=0.0, lr=2e-3,
                       crop=False)
  c = common.base_config("vit")
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint_every = 200
  c.optim.lr = a.lr
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.model = vit_model(f"{a.variant}/{a.patch}", a.pool, a.stem, num_classes=10)
  c.loss = classification_loss(a.smoothing, a.mixup, a.cutmix)
  c.distill = distill(a.teacher, unlabelled=a.unlabelled)
  c.init = ml_collections.ConfigDict({"mae_workdir": ml_collections.FieldReference(a.mae, str)})
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


def vit_model(variant: str, pool: str = "cls", stem: str = "linear", *, num_classes: int,
              dtype: str = "float32", remat: str = "none") -> ml_collections.ConfigDict:
  """model: the ViTConfig keys under `vision`; num_classes 0 = the dataset's."""
  return ml_collections.ConfigDict({
      "vision": {"variant": variant, "pool": pool, "stem": stem, "attention_impl": "auto"},
      "num_classes": num_classes, "dtype": dtype, "scan": True, "remat": remat})


def classification_loss(smoothing: float = 0.1, mixup: float = 0.0,
                        cutmix: float = 0.0) -> ml_collections.ConfigDict:
  """Label smoothing; mixup / cutmix Beta(alpha, alpha) (0 = off), one of them per
  batch (cutmix with probability switch_prob) when both are on."""
  return ml_collections.ConfigDict({"label_smoothing": smoothing, "mixup_alpha": mixup,
                                    "cutmix_alpha": cutmix, "switch_prob": 0.5})


def distill(teacher_workdir: str | None = None, weight: float = 0.5,
            unlabelled: bool = False) -> ml_collections.ConfigDict:
  """DeiT hard-label distillation from a classifier run (None = off);
  `unlabelled`: the student also trains on the train images whose labels
  data.label_fraction held back, with the teacher's labels only."""
  return ml_collections.ConfigDict({
      "teacher_workdir": ml_collections.FieldReference(teacher_workdir, str), "weight": weight,
      "unlabelled": unlabelled})
