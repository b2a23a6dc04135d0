"""Classification on a ViT: the class-token head and DeiT's distillation token.

DeiT (Touvron et al. 2021) appends a second learned token beside the class
token; its own head is trained to predict the teacher's labels. At test time
the two heads' softmax outputs are averaged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.vit import ViT, ViTConfig


class ViTClassifier(nn.Module):
  """images -> (logits [B, C], out). The ViT's own head reads the pooled token
  (class token, gap or map); with `distill`, `out["dist_logits"]` reads token 1,
  the distillation token (the config needs num_prefix_tokens >= 2)."""

  config: ViTConfig
  distill: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    cfg = self.config
    if not cfg.num_classes:
      raise ValueError("ViTClassifier needs ViTConfig.num_classes > 0")
    if self.distill and cfg.num_prefix_tokens < 2:
      raise ValueError("a distillation token needs model.vision.num_prefix_tokens >= 2 "
                       "(token 0: class, token 1: distillation)")
    logits, out = ViT(cfg, name="vit")(images, train)
    if self.distill:
      out["dist_logits"] = nn.Dense(
          cfg.num_classes, dtype=jnp.dtype(cfg.dtype), name="dist_head",
          kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)))(
              out["tokens"][:, 1])
    return logits, out


def predict_probs(logits: jax.Array, dist_logits: jax.Array | None = None) -> jax.Array:
  """Class probabilities [B, C]: the softmax, averaged over both heads with distillation."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if dist_logits is None:
    return probs
  return 0.5 * (probs + jax.nn.softmax(dist_logits.astype(jnp.float32), axis=-1))
