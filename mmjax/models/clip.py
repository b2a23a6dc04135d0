"""CLIP: a ViT and a text transformer projected into one embedding space.

logits = exp(t) * normalize(I) @ normalize(T)^T with a learnable log-scale t,
initialised at ln(1/0.07) and clamped at ln(100); SigLIP adds a learnable bias
and starts t at ln(10), b at -10.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import text, vit
from mmjax.models.text import TextConfig, TextTransformer
from mmjax.models.vit import ViT, ViTConfig

MAX_LOG_SCALE = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: ViTConfig = ViTConfig(pre_norm=True, norm_eps=1e-5)
  text: TextConfig = TextConfig()
  embed_dim: int = 512
  loss: str = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  # None picks the paper's value for the loss: ln(1/0.07) or ln(10).
  init_log_scale: float | None = None
  init_bias: float = -10.0

  @property
  def log_scale_init(self) -> float:
    if self.init_log_scale is not None:
      return self.init_log_scale
    return math.log(1 / 0.07) if self.loss == "softmax" else math.log(10.0)


def forward_flops(cfg: CLIPConfig, batch_size: int = 1) -> float:
  """Forward FLOPs per image-text pair: both towers, projections, and its row of logits."""
  d_img = cfg.vision.size["width"]
  d_txt = cfg.text.dims[0]
  proj = 2 * (d_img + d_txt) * cfg.embed_dim
  logits = 2 * batch_size * cfg.embed_dim
  return (vit.forward_flops(cfg.vision, pooled_only=True)
          + text.forward_flops(cfg.text, pooled_only=True) + proj + logits)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class CLIP(nn.Module):
  """Two towers. `__call__` returns a dict with normalised embeddings and the scale."""

  config: CLIPConfig

  def setup(self):
    cfg = self.config
    proj_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "proj"))
    self.vision = ViT(cfg.vision)
    self.text = TextTransformer(cfg.text)
    self.image_proj = nn.Dense(cfg.embed_dim, use_bias=False, kernel_init=proj_init,
                               dtype=jnp.dtype(cfg.vision.dtype))
    self.text_proj = nn.Dense(cfg.embed_dim, use_bias=False, kernel_init=proj_init,
                              dtype=jnp.dtype(cfg.text.dtype))
    self.log_scale = self.param(
        "log_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.log_scale_init), ()),
        (), jnp.float32)
    if cfg.loss == "sigmoid":
      self.bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.constant(cfg.init_bias), ()), (), jnp.float32)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> L2-normalised [B, embed_dim] in float32."""
    pooled, _ = self.vision(images, pooled_only=True)
    return l2_normalize(self.image_proj(pooled))

  def encode_text(self, ids: jax.Array, padding: jax.Array | None = None) -> jax.Array:
    """[B, T] ids -> L2-normalised [B, embed_dim] in float32."""
    pooled, _ = self.text(ids, padding, pooled_only=True)
    return l2_normalize(self.text_proj(pooled))

  def __call__(self, images, ids, padding=None):
    out = {
        "image_embeds": self.encode_image(images),
        "text_embeds": self.encode_text(ids, padding),
        # Clamped in the forward pass, so the scale never exceeds 100.
        "logit_scale": jnp.exp(jnp.minimum(self.log_scale, MAX_LOG_SCALE)),
    }
    if self.config.loss == "sigmoid":
      out["logit_bias"] = self.bias
    return out
