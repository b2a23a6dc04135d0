"""A small ConvNet classifier: the DeiT-style teacher whose inductive bias (locality,
translation equivariance) a ViT student distils from.

Stages of two 3x3 convs (GroupNorm, ReLU), each stage after the first halving
the resolution; global average pooling and a linear head. GroupNorm, not
BatchNorm: the train state holds params only.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
  channels: tuple[int, ...] = (32, 64, 128)  # per stage
  convs_per_stage: int = 2
  num_classes: int = 10
  image_size: int = 32
  groups: int = 8
  dtype: str = "float32"


def forward_flops(cfg: ConvNetConfig) -> float:
  """Forward FLOPs per image (2 per multiply-add): convs and the head."""
  flops, size, c_in = 0.0, cfg.image_size, 3
  for i, c in enumerate(cfg.channels):
    if i:
      size = -(-size // 2)  # stride-2 first conv of the stage
    for _ in range(cfg.convs_per_stage):
      flops += 2 * size * size * 9 * c_in * c
      c_in = c
  return flops + 2 * c_in * cfg.num_classes


class ConvNet(nn.Module):
  """images [B, H, W, 3] -> (logits [B, classes], {"pre_logits": [B, C]})."""

  config: ConvNetConfig

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    del train
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = images.astype(dtype)
    for i, c in enumerate(cfg.channels):
      for j in range(cfg.convs_per_stage):
        stride = 2 if i and not j else 1
        x = nn.Conv(c, (3, 3), strides=(stride, stride), dtype=dtype, name=f"conv{i}_{j}",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.he_normal(), (None, None, None, "mlp")))(x)
        x = nn.GroupNorm(num_groups=min(cfg.groups, c), dtype=dtype, name=f"gn{i}_{j}")(x)
        x = nn.relu(x)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(cfg.num_classes, dtype=dtype, name="head",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.zeros, ("mlp", None)))(pooled)
    return logits, {"pre_logits": pooled, "logits": logits}
