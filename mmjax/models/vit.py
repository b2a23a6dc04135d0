"""Vision Transformer: P x P patches, z_i = W_emb flatten(x_i) + e_i, a class token.

Variants are named as in the ViT paper ("B/16": width B, patch 16) and decoded
from the single table `VIT_SIZES`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import attention, layers

# name -> (width, depth, mlp_dim, heads). From the ViT / big_vision tables.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 64, 2),  # for tests only
    "nano": (64, 4, 256, 4),  # CPU-sized, for the embedded datasets
    "micro": (128, 4, 512, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
  """'B/16' -> {width, depth, mlp_dim, num_heads, patch_size}."""
  size, _, patch = variant.partition("/")
  if size not in VIT_SIZES or not patch.isdigit():
    raise ValueError(
        f"unknown ViT variant {variant!r}; expected SIZE/PATCH with SIZE in {list(VIT_SIZES)}, e.g. 'B/16'")
  width, depth, mlp_dim, heads = VIT_SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/P)*(W/P), P*P*C], row-major patches, (py, px, c) inside."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def resample_posemb(posemb: jax.Array, new_grid: int, num_prefix: int = 1) -> jax.Array:
  """Resizes a [num_prefix + g*g, D] position embedding to a new_grid x new_grid grid.

  The prefix rows (class / distillation tokens) are kept; the grid is resized
  bilinearly, as when fine-tuning at a different resolution.
  """
  prefix, grid = posemb[:num_prefix], posemb[num_prefix:]
  old = int(round(np.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f"position embedding has {grid.shape[0]} grid rows, not a square")
  if old == new_grid:
    return posemb
  grid = grid.reshape(old, old, -1)
  grid = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method="bilinear")
  return jnp.concatenate([prefix, grid.reshape(new_grid * new_grid, -1)], axis=0)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""

  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    heads = (self.num_heads, d // self.num_heads)
    proj = functools.partial(layers.DenseND, heads, ("embed", "heads", "kv"), dtype=self.dtype)
    q, k, v = proj(name="query")(probe), proj(name="key")(x), proj(name="value")(x)
    out = jax.nn.dot_product_attention(q, k, v)
    out = layers.DenseND((d,), ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype,
                         name="out")(out)
    y = layers.LayerNorm(self.norm_eps, self.dtype, name="norm")(out)
    out = out + layers.MLP(self.mlp_dim, act="gelu", dtype=self.dtype, name="mlp")(y)
    return out[:, 0]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  variant: str = "B/16"
  image_size: int = 224
  pool: str = "cls"  # cls | gap | map | none
  act: str = "gelu"
  norm_eps: float = 1e-6
  pre_norm: bool = False  # CLIP's "pre_layrnorm" after the embeddings
  num_classes: int = 0  # > 0 adds a classification head
  scan: bool = True
  remat: str = "none"
  dtype: str = "float32"
  stem: str = "linear"  # linear | conv (hybrid stem)
  attention_impl: str = "auto"  # auto | cpu | xla | cudnn | splash (mmjax.models.attention)
  num_prefix_tokens: int = 1  # 1 = class token; 0 = none (gap / map pooling)
  # Explicit sizes (0 = the variant's), for imported checkpoints whose dims are
  # not in VIT_SIZES; with all four set the variant's SIZE may be "custom".
  width: int = 0
  depth: int = 0
  mlp_dim: int = 0
  num_heads: int = 0

  def __post_init__(self):
    attention.check_name(self.attention_impl, "ViTConfig.attention_impl")

  @property
  def size(self) -> dict[str, int]:
    explicit = {k: getattr(self, k) for k in ("width", "depth", "mlp_dim", "num_heads")}
    if all(explicit.values()):
      patch = self.variant.partition("/")[2]
      if not patch.isdigit():
        raise ValueError(f"ViT variant {self.variant!r} names no patch size, e.g. 'custom/14'")
      return dict(explicit, patch_size=int(patch))
    size = decode_variant(self.variant)
    size.update({k: v for k, v in explicit.items() if v})
    return size

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.size["patch_size"]) ** 2


def pools_one_token(cfg: ViTConfig) -> bool:
  """Whether `ViT(..., pooled_only=True)` runs the last block at the class token alone."""
  return cfg.pool == "cls" and cfg.num_prefix_tokens >= 1 and not cfg.scan


def forward_flops(cfg: ViTConfig, pooled_only: bool = False) -> float:
  """Forward FLOPs per image: the encoder plus the patch embedding (the last
  block at the class token alone when `pooled_only` and `pools_one_token`)."""
  size = cfg.size
  n, d = cfg.num_patches, size["width"]
  seq = n + cfg.num_prefix_tokens
  embed = 2 * n * 3 * size["patch_size"] ** 2 * d
  head = 2 * d * cfg.num_classes
  last = 1 if pooled_only and pools_one_token(cfg) else None
  return layers.stack_forward_flops(size["depth"], seq, d, size["mlp_dim"],
                                    num_heads=size["num_heads"], last_queries=last) + embed + head


class ConvStem(nn.Module):
  """Hybrid stem: stride-2 3x3 convs down to the patch grid, then a 1x1 projection."""

  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    steps = int(np.log2(self.patch_size))
    if 2 ** steps != self.patch_size:
      raise ValueError(f"the conv stem needs a power-of-two patch size, got {self.patch_size}")
    ch = max(self.width // 2 ** steps, 16)
    for i in range(steps):
      x = nn.Conv(ch * 2 ** i, (3, 3), strides=(2, 2), dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.GroupNorm(num_groups=min(8, ch * 2 ** i), dtype=self.dtype, name=f"gn{i}")(x)
      x = nn.relu(x)
    x = nn.Conv(self.width, (1, 1), dtype=self.dtype, name="proj",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, None, "embed")))(x)
    return x.reshape(x.shape[0], -1, self.width)


class ViT(nn.Module):
  """ViT encoder. Returns (output, out) where `out` names the intermediates.

  out: "tokens" [B, N, D] (encoder output after the final norm),
  "hidden_states" [L + 1, B, N, D] (the embeddings, then each block's output,
  as in transformers; only with `collect_hidden`), "pre_logits" [B, D] (pooled),
  "logits" [B, classes] when the config has a head.

  With `pooled_only` (and pool "cls", unrolled layers) the last block runs at
  the class token alone, which gives the same "pre_logits" and "logits" for
  less work; "tokens" is then absent.

  `keep` [B, K] (int): the encoder sees only these patches (row-major patch
  indices, after their position embeddings), as MAE's encoder does; the
  sequence is then the prefix tokens and the K kept patches.

  With `sow_attention`, each block's softmax weights are sown into the
  `intermediates` collection (apply with mutable=["intermediates"]);
  `stacked_attention` turns them into one [L, B, heads, N, N] array.
  """

  config: ViTConfig
  collect_hidden: bool = False
  sow_attention: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, keep: jax.Array | None = None,
               pooled_only: bool = False):
    cfg = self.config
    size = cfg.size
    dtype = jnp.dtype(cfg.dtype)
    width, patch = size["width"], size["patch_size"]
    if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
      raise ValueError(f"ViT configured for {cfg.image_size}px images, got {images.shape[1:3]}")
    images = images.astype(dtype)

    if cfg.stem == "conv":
      x = ConvStem(width, patch, dtype, name="stem")(images)
    elif cfg.stem == "linear":
      x = nn.Dense(width, dtype=dtype, name="patch_embed", dot_general=layers.dense_dot_general,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.lecun_normal(), ("patch", "embed")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                       patchify(images, patch))
    else:
      raise ValueError(f"unknown ViT stem {cfg.stem!r}; choose 'linear' or 'conv'")
    n = x.shape[1]
    prefix = cfg.num_prefix_tokens

    cls = None
    if prefix:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "embed")), (prefix, width), jnp.float32)
    posemb = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("pos", "embed")), (prefix + n, width),
        jnp.float32).astype(dtype)
    x = x + posemb[None, prefix:]
    if keep is not None:
      if cfg.stem != "linear":
        raise ValueError("ViT(keep=...) needs stem='linear': a conv stem mixes neighbouring "
                         "patches, so masked pixels would leak into the visible tokens")
      x = layers.take_rows(x, keep)  # [B, K, D]: visible patches only
    if cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype) + posemb[:prefix],
                                            (x.shape[0], prefix, width)), x], axis=1)
    x = layers.act_constrain(x)
    if cfg.pre_norm:
      x = layers.LayerNorm(cfg.norm_eps, dtype, name="pre_norm")(x)
    embeddings = x
    one_token = pooled_only and pools_one_token(cfg) and not self.collect_hidden
    query_index = jnp.zeros((x.shape[0], 1), jnp.int32) if one_token else None

    x, hidden, _ = layers.Stack(
        depth=size["depth"],
        block_kwargs=dict(num_heads=size["num_heads"], head_dim=width // size["num_heads"],
                          mlp_dim=size["mlp_dim"], act=cfg.act, norm_eps=cfg.norm_eps,
                          dtype=dtype, sow_attention=self.sow_attention,
                          attention_impl=cfg.attention_impl),
        scan=cfg.scan, remat=cfg.remat, collect_hidden=self.collect_hidden,
        name="encoder")(x, query_index=query_index)
    out = {}
    if self.collect_hidden:
      out["hidden_states"] = jnp.concatenate([embeddings[None], hidden], axis=0)
    x = layers.LayerNorm(cfg.norm_eps, dtype, name="final_norm")(x)
    if not one_token:
      out["tokens"] = x

    if cfg.pool == "cls":
      if not cfg.num_prefix_tokens:
        raise ValueError("pool='cls' needs a class token (num_prefix_tokens >= 1)")
      pooled = x[:, 0]
    elif cfg.pool == "gap":
      pooled = jnp.mean(x[:, cfg.num_prefix_tokens:], axis=1)
    elif cfg.pool == "map":
      pooled = MAPHead(size["num_heads"], size["mlp_dim"], cfg.norm_eps, dtype, name="map_head")(x)
    elif cfg.pool == "none":
      pooled = None
    else:
      raise ValueError(f"unknown ViT pooling {cfg.pool!r}; choose cls, gap, map or none")
    out["pre_logits"] = pooled
    if cfg.num_classes:
      out["logits"] = nn.Dense(cfg.num_classes, dtype=dtype, name="head",
                               kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.zeros, ("embed", None)))(pooled)
      return out["logits"], out
    return pooled, out


def stacked_attention(intermediates: dict, depth: int) -> jax.Array:
  """A ViT's sown attention weights (see `ViT.sow_attention`) -> [L, B, heads, N, N].

  `intermediates` is the collection of a ViT applied on its own; scanned
  encoders sow one array stacked on the layer axis, unrolled ones one per layer.
  """
  encoder = intermediates.get("encoder", {})
  if "layers" in encoder:
    weights = encoder["layers"]["block"]["attn"]["attention"][0]
  else:
    missing = [i for i in range(depth) if f"layers_{i}" not in encoder]
    if missing:
      raise ValueError(f"no sown attention weights for encoder layers {missing}: apply the ViT "
                       f"with sow_attention=True and mutable=['intermediates']")
    weights = jnp.stack([encoder[f"layers_{i}"]["block"]["attn"]["attention"][0]
                         for i in range(depth)])
  if weights.shape[0] != depth:
    raise ValueError(f"sown attention has {weights.shape[0]} layers, the ViT {depth}")
  return weights
