"""CLIP ViT-L/14 (open_clip sizes: embed 768, vision 24 x 1024, text 12 x 768).

  python -m mmjax.train --config=experiments/clip_vit_l14.py --workdir=DIR --config.mesh.fsdp=16
"""

from experiments import clip_vit_b16


def get_config(arg=None):
  arg = ",".join(filter(None, ["variant=L/14,text=L,embed=768", arg or ""]))
  c = clip_vit_b16.get_config(arg)
  c.optim.lr = 4e-4
  # Keep the attention's projections and output, recompute the MLP: at 512
  # pairs per chip the MLP's hidden layer ([24, 512, 257, 4096] bf16) alone is
  # 24 GiB, which `dots_no_batch` would keep (97 GiB per v5p chip in all).
  c.model.remat = "save_attention"
  return c
