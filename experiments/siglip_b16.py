"""SigLIP ViT-B/16: the sigmoid loss (t starts at ln 10, b at -10), wd 1e-4, lr 1e-3.

  python -m mmjax.train --config=experiments/siglip_b16.py --workdir=DIR
"""

from experiments import clip_vit_b16


def get_config(arg=None):
  arg = ",".join(filter(None, ["loss=sigmoid,embed=768", arg or ""]))
  c = clip_vit_b16.get_config(arg)
  c.model.vision.pool = "map"
  c.model.vision.num_prefix_tokens = 0
  c.model.vision.norm_eps = 1e-6
  c.model.vision.pre_norm = False
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.b2 = 0.95
  c.data.transforms.normalize = "minus_one_one"
  return c
