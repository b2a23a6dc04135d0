"""A forward pass of a tiny CLIP on one synthetic batch: embedding shapes and the loss."""

import jax

from mmjax.losses import clip_softmax_loss
from mmjax.models.clip import CLIP, CLIPConfig
from mmjax.models.text import TextConfig
from mmjax.models.vit import ViTConfig


def main():
  cfg = CLIPConfig(vision=ViTConfig(variant="tiny/8", image_size=32, pre_norm=True),
                   text=TextConfig(size="tiny", vocab_size=64, context_length=16), embed_dim=16)
  images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  ids = jax.random.randint(jax.random.key(1), (8, 16), 3, 64).at[:, 10].set(cfg.text.eos_id)
  model = CLIP(cfg)
  variables = jax.jit(model.init)(jax.random.key(2), images, ids)
  out = jax.jit(model.apply)(variables, images, ids)
  loss, _ = clip_softmax_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
  print(f"image_embeds {out['image_embeds'].shape}  text_embeds {out['text_embeds'].shape}  "
        f"logit_scale {float(out['logit_scale']):.3f}  loss {float(loss):.4f}")


if __name__ == "__main__":
  main()
