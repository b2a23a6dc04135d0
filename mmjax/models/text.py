"""CLIP text transformer: token + position embedding, causal blocks, pooled at EOS."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import attention, layers

# name -> (width, depth, heads). open_clip's text towers.
TEXT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (32, 2, 2),  # for tests only
    "nano": (64, 3, 4),  # CPU-sized, for the embedded datasets
    "micro": (128, 4, 4),
    "S": (384, 6, 6),
    "B": (512, 12, 8),
    "L": (768, 12, 12),
    "H": (1024, 24, 16),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  size: str = "B"
  vocab_size: int = 49408
  context_length: int = 77
  mlp_ratio: int = 4
  act: str = "gelu"
  norm_eps: float = 1e-5
  # Pooling: "eos" = first position holding eos_id; "argmax" = argmax of the
  # ids (OpenAI's tokenizer gives EOT the largest id).
  pool: str = "eos"
  eos_id: int = 2
  pad_id: int = 0
  scan: bool = True
  remat: str = "none"
  dtype: str = "float32"
  attention_impl: str = "auto"  # auto | cpu | xla | cudnn | splash (mmjax.models.attention)
  # Explicit sizes (0 = the size's), for imported checkpoints whose dims are not
  # in TEXT_SIZES; with width, depth and num_heads set, `size` may be "custom".
  width: int = 0
  depth: int = 0
  num_heads: int = 0
  mlp_dim: int = 0  # 0 = width * mlp_ratio

  def __post_init__(self):
    attention.check_name(self.attention_impl, "TextConfig.attention_impl")

  @property
  def dims(self) -> tuple[int, int, int]:
    explicit = (self.width, self.depth, self.num_heads)
    if all(explicit):
      return explicit
    if self.size not in TEXT_SIZES:
      raise ValueError(f"unknown text tower size {self.size!r}; choose one of {list(TEXT_SIZES)} "
                       f"or set width, depth and num_heads")
    return tuple(e or d for e, d in zip(explicit, TEXT_SIZES[self.size]))

  @property
  def hidden_dim(self) -> int:
    """The MLP's hidden width."""
    return self.mlp_dim or self.dims[0] * self.mlp_ratio


def pools_one_token(cfg: TextConfig) -> bool:
  """Whether `TextTransformer(..., pooled_only=True)` runs the last block at the
  pooled token alone (unrolled layers; a scanned stack runs every block whole)."""
  return not cfg.scan


def forward_flops(cfg: TextConfig, pooled_only: bool = False) -> float:
  """Forward FLOPs per text of `context_length` tokens (the embedding is a
  lookup); the last block at the pooled token alone when `pooled_only` and
  `pools_one_token`."""
  width, depth, heads = cfg.dims
  last = 1 if pooled_only and pools_one_token(cfg) else None
  return layers.stack_forward_flops(depth, cfg.context_length, width, cfg.hidden_dim,
                                    num_heads=heads, last_queries=last)


def eos_positions(ids: jax.Array, pool: str, eos_id: int) -> jax.Array:
  """Index of the pooled token per row of [B, T] ids.

  A row without any EOS (truncated without keeping it) pools at its last token.
  """
  if pool == "argmax":
    return jnp.argmax(ids, axis=-1)
  if pool == "eos":
    is_eos = ids == eos_id
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(jnp.any(is_eos, axis=-1), first, ids.shape[-1] - 1)
  raise ValueError(f"unknown text pooling {pool!r}; choose 'eos' or 'argmax'")


class TextTransformer(nn.Module):
  """Returns (pooled [B, D], out) with out["tokens"] [B, T, D] after the final norm.

  With `pooled_only` (and unrolled layers) the last block runs at the pooled
  token alone: the same pooled output for less work, and no "tokens".
  `padding` [B, T] is True at real tokens, which come first (ids are right
  padded, as CLIP's tokenizers pad).
  """

  config: TextConfig

  @nn.compact
  def __call__(self, ids: jax.Array, padding: jax.Array | None = None,
               pooled_only: bool = False):
    cfg = self.config
    width, depth, heads = cfg.dims
    dtype = jnp.dtype(cfg.dtype)
    b, t = ids.shape
    if t > cfg.context_length:
      raise ValueError(f"text of length {t} exceeds the context length {cfg.context_length}")
    tok = layers.Embed(cfg.vocab_size, width, dtype=dtype, name="token_embed",
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.normal(0.02), ("vocab", "embed")))(ids)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("pos", "embed")), (cfg.context_length, width), jnp.float32)
    x = layers.act_constrain(tok + pos[:t].astype(dtype)[None])
    mask = attention.AttentionMask(kv_valid=padding, causal=True, right_padded=True)
    idx = eos_positions(ids, cfg.pool, cfg.eos_id)
    one_token = pooled_only and pools_one_token(cfg)
    x, _, _ = layers.Stack(
        depth=depth,
        block_kwargs=dict(num_heads=heads, head_dim=width // heads, mlp_dim=cfg.hidden_dim,
                          act=cfg.act, norm_eps=cfg.norm_eps, dtype=dtype,
                          attention_impl=cfg.attention_impl),
        scan=cfg.scan, remat=cfg.remat, name="encoder")(
            x, mask, query_index=idx[:, None] if one_token else None)
    x = layers.LayerNorm(cfg.norm_eps, dtype, name="final_norm")(x)
    if one_token:
      return x[:, 0], {"eos_index": idx}
    pooled = layers.take_rows(x, idx[:, None])[:, 0]
    return pooled, {"tokens": x, "eos_index": idx}
