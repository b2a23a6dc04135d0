"""MAE pretraining of a ViT encoder on sklearn's digits, without labels; then

  python -m mmjax.train --config=experiments/mae_digits.py --workdir=runs/mae_digits
  python -m mmjax.train --config=experiments/vit_digits.py:mae=runs/mae_digits ...

The encoder keys (variant, patch) must match the classifier that fine-tunes it.
`:dataset=shapes,image_size=64` pretrains on the synthetic scenes instead (an
8 x 8 patch grid whose position embeddings `mmjax.visualize` can show).
"""

import ml_collections

from experiments import common
from experiments.vit_digits import vit_model
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, image_size=32, steps=1000, batch=128, variant="nano",
                       patch=8, mask=0.75, decoder_width=64, decoder_depth=2, lr=2e-3, crop=True,
                       transpose=False, dataset="digits")
  c = common.base_config("mae")
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.log_every = 25
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optim.lr = a.lr
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.optim.b2 = 0.95  # MAE's AdamW betas (0.9, 0.95)
  c.model = vit_model(f"{a.variant}/{a.patch}", "none", "linear", num_classes=0)
  c.model.mae = ml_collections.ConfigDict({
      "mask_ratio": a.mask, "decoder_width": a.decoder_width, "decoder_depth": a.decoder_depth,
      "decoder_heads": 4, "decoder_mlp_dim": 4 * a.decoder_width, "norm_pix_loss": True})
  c.data = default_data_config(a.dataset)  # every train image; labels are not read
  c.data.image_size = a.image_size
  c.data.transforms.random_resized_crop = a.crop
  c.data.transforms.crop_scale = (0.6, 1.0)
  # `transpose=true`: half the images with rows and columns swapped, so that
  # the position embeddings see rows and columns alike.
  c.data.transforms.transpose = a.transpose
  c.eval.batch_size = 128
  if a.runlocal:
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 20, 10
    c.batch_size = 32
  return c
