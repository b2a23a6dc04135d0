"""CLIP ViT-L/14 (open_clip sizes: embed 768, vision 24 x 1024, text 12 x 768).

  python -m mmjax.train --config=experiments/clip_vit_l14.py --workdir=DIR --config.mesh.fsdp=16
"""

from experiments import clip_vit_b16


def get_config(arg=None):
  arg = ",".join(filter(None, ["variant=L/14,text=L,embed=768", arg or ""]))
  c = clip_vit_b16.get_config(arg)
  c.optim.lr = 4e-4
  return c
