"""Masked autoencoder (He et al. 2022): pretrain a ViT by reconstructing masked patches.

A random `mask_ratio` of the patches is removed per image; the encoder runs on
the visible ones only (gathered, not zeroed, so it never sees masked pixels).
A light decoder puts a shared mask token at every masked position, adds its
own position embedding, and predicts the pixels of every patch; the loss is
the mean squared error on the masked patches, against per-patch normalised
pixels (each patch minus its mean, over its standard deviation).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models import vit as vit_lib


@dataclasses.dataclass(frozen=True)
class MAEConfig:
  encoder: vit_lib.ViTConfig  # stem 'linear', pool 'none', no head
  mask_ratio: float = 0.75
  decoder_width: int = 64
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 256
  norm_pix_loss: bool = True

  @property
  def num_masked(self) -> int:
    """Masked patches per image: round(mask_ratio * N), leaving at least one visible."""
    n = self.encoder.num_patches
    return min(max(int(round(self.mask_ratio * n)), 0), n - 1)


def random_masking(rng: jax.Array, batch: int, num_patches: int,
                   num_masked: int) -> tuple[jax.Array, jax.Array]:
  """A uniformly random set of `num_masked` patches per image.

  Returns keep [B, N - num_masked] (the visible patch indices, ascending) and
  mask [B, N] float32 (1 = masked).
  """
  noise = jax.random.uniform(rng, (batch, num_patches))
  keep = jnp.sort(jnp.argsort(noise, axis=-1)[:, :num_patches - num_masked], axis=-1)
  mask = jnp.ones((batch, num_patches), jnp.float32)
  mask = mask.at[jnp.arange(batch)[:, None], keep].set(0.0)
  return keep, mask


def reconstruction_targets(images: jax.Array, patch: int, norm_pix: bool = True) -> jax.Array:
  """[B, N, P*P*3] pixels per patch, normalised per patch when `norm_pix`."""
  target = vit_lib.patchify(images.astype(jnp.float32), patch)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch: int,
             norm_pix: bool = True) -> jax.Array:
  """Mean squared error over the masked patches only (mask [B, N], 1 = masked)."""
  target = reconstruction_targets(images, patch, norm_pix)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)  # [B, N]
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def forward_flops(cfg: MAEConfig) -> float:
  """Forward FLOPs per image: the encoder on the visible patches, the decoder on all."""
  enc = cfg.encoder
  size = enc.size
  n, d = enc.num_patches, size["width"]
  visible = n - cfg.num_masked
  encoder = layers.stack_forward_flops(size["depth"], visible + enc.num_prefix_tokens, d,
                                       size["mlp_dim"], num_heads=size["num_heads"])
  embed = 2 * visible * 3 * size["patch_size"] ** 2 * d
  seq = n + enc.num_prefix_tokens
  decoder = layers.stack_forward_flops(cfg.decoder_depth, seq, cfg.decoder_width,
                                       cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads)
  io = 2 * seq * d * cfg.decoder_width + 2 * n * cfg.decoder_width * 3 * size["patch_size"] ** 2
  return encoder + embed + decoder + io


class MAEDecoder(nn.Module):
  """Encoded tokens (prefix + visible) -> predicted pixels of every patch [B, N, P*P*3]."""

  config: MAEConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, keep: jax.Array) -> jax.Array:
    cfg = self.config
    enc = cfg.encoder
    dtype = jnp.dtype(enc.dtype)
    n, prefix, dw = enc.num_patches, enc.num_prefix_tokens, cfg.decoder_width
    b = tokens.shape[0]
    x = nn.Dense(dw, dtype=dtype, name="embed", dot_general=layers.dense_dot_general,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.xavier_uniform(), ("embed", None)))(tokens)
    mask_token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None)), (1, dw), jnp.float32)
    full = jnp.broadcast_to(mask_token.astype(dtype), (b, n, dw))
    full = full.at[jnp.arange(b)[:, None], keep].set(x[:, prefix:])  # visible back in place
    x = jnp.concatenate([x[:, :prefix], full], axis=1)
    posemb = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None)), (prefix + n, dw), jnp.float32)
    x = x + posemb.astype(dtype)[None]
    x, _, _ = layers.Stack(
        depth=cfg.decoder_depth,
        block_kwargs=dict(num_heads=cfg.decoder_heads, head_dim=dw // cfg.decoder_heads,
                          mlp_dim=cfg.decoder_mlp_dim, act=enc.act, norm_eps=enc.norm_eps,
                          dtype=dtype),
        scan=enc.scan, remat=enc.remat, name="blocks")(x)
    x = layers.LayerNorm(enc.norm_eps, dtype, name="norm")(x)
    pixels = 3 * enc.size["patch_size"] ** 2
    return nn.Dense(pixels, dtype=dtype, name="pred",
                    dot_general=layers.dense_dot_general)(x[:, prefix:])


class MAE(nn.Module):
  """(images, keep) -> (pred [B, N, P*P*3], encoder out). `keep` from `random_masking`."""

  config: MAEConfig

  @nn.compact
  def __call__(self, images: jax.Array, keep: jax.Array):
    enc = self.config.encoder
    if enc.stem != "linear" or enc.num_classes:
      raise ValueError("the MAE encoder needs stem='linear' and no head (num_classes=0)")
    _, out = vit_lib.ViT(enc, name="encoder")(images, keep=keep)
    return MAEDecoder(self.config, name="decoder")(out["tokens"], keep), out
