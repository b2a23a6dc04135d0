"""Decoder-only language model, Llama-style: RMSNorm, RoPE, SwiGLU, grouped-query
attention, tied or untied output embedding, scanned layers and a KV cache.

Sizes come from the single table `LLM_SIZES` (a tiny test size up to 13B).

The param tree (scanned; every leaf of `decoder/layers` has a leading [L] axis),
with the transformers `LlamaForCausalLM` names it converts to:

  embed_tokens/embedding            [V, D]        model.embed_tokens.weight
  decoder/layers/block/
    norm1/scale                     [L, D]        model.layers.N.input_layernorm.weight
    attn/query/kernel               [L, D, N, H]  model.layers.N.self_attn.q_proj.weight^T
    attn/key/kernel                 [L, D, K, H]  ...k_proj.weight^T   (K = num_kv_heads)
    attn/value/kernel               [L, D, K, H]  ...v_proj.weight^T
    attn/out/kernel                 [L, N, H, D]  ...o_proj.weight^T
    norm2/scale                     [L, D]        model.layers.N.post_attention_layernorm.weight
    mlp/gate/kernel                 [L, D, F]     model.layers.N.mlp.gate_proj.weight^T
    mlp/up/kernel                   [L, D, F]     model.layers.N.mlp.up_proj.weight^T
    mlp/down/kernel                 [L, F, D]     model.layers.N.mlp.down_proj.weight^T
  norm/scale                        [D]           model.norm.weight
  lm_head/kernel                    [D, V]        lm_head.weight^T   (absent when tied)

A torch [out, in] projection becomes [in, out] and the head dims are split out
(q_proj.weight.T.reshape(D, N, H)). RoPE uses the split-half (`rotate_half`)
convention of transformers, so HF q/k weights need no permutation. With
`scan=False` the layers are `decoder/layers_N/block/...` without the [L] axis
(`layers.unstack_layers` converts).

The KV cache (`init_cache`) is {"k", "v": [L, B, S, K, H], "index": int32 [L]}:
the Stack scans it with the layers. A call with a cache writes its T new keys
at `index` and attends over all S slots under the caller's mask, so any slot
left unwritten (or padding) must be masked out; `positions` are then explicit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import attention, layers

# name -> architecture. Widths, depths, heads and MLP dims of the public models;
# "tiny" is for tests, "nano" / "micro" train on a CPU in minutes.
LLM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    "nano": dict(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384),
    "micro": dict(width=256, depth=4, num_heads=8, num_kv_heads=4, mlp_dim=768),
    # Llama-3.2-1B: tied embeddings, theta 5e5.
    "1B": dict(width=2048, depth=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
               vocab_size=128256, rope_theta=500000.0, tie_embeddings=True),
    # Llama-2-7B / Vicuna-7B (v1.5): the LLM of LLaVA-1.5-7B.
    "7B": dict(width=4096, depth=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
               vocab_size=32000, rope_theta=10000.0, norm_eps=1e-5),
    # Llama-3-8B: GQA with 8 kv heads.
    "8B": dict(width=4096, depth=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
               vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5),
    # Llama-2-13B / Vicuna-13B.
    "13B": dict(width=5120, depth=40, num_heads=40, num_kv_heads=40, mlp_dim=13824,
                vocab_size=32000, rope_theta=10000.0, norm_eps=1e-5),
}


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0  # 0: width // num_heads
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = "float32"
  scan: bool = True
  remat: str = "none"
  attention_impl: str = "auto"  # auto | cpu | xla | cudnn | splash (mmjax.models.attention)

  def __post_init__(self):
    attention.check_name(self.attention_impl, "LLMConfig.attention_impl")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.width // self.num_heads


def llm_config(size: str, **overrides) -> LLMConfig:
  """The table entry `size` with `overrides` (e.g. vocab_size of a tokenizer).

  size "custom": no table entry, the overrides give the architecture (imported
  checkpoints whose dims are not in LLM_SIZES)."""
  if size not in LLM_SIZES and size != "custom":
    raise ValueError(f"unknown LLM size {size!r}; choose one of {list(LLM_SIZES)} or 'custom'")
  values = {**LLM_SIZES.get(size, {}), **{k: v for k, v in overrides.items() if v is not None}}
  known = {f.name for f in dataclasses.fields(LLMConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown LLMConfig keys {unknown}; known: {sorted(known)}")
  return LLMConfig(**values)


def forward_flops(cfg: LLMConfig, seq: int, head_positions: int | None = None) -> float:
  """Forward FLOPs of one sequence of `seq` tokens: the blocks and the output
  head, the latter at `head_positions` of them (default all)."""
  blocks = layers.stack_forward_flops(
      cfg.depth, seq, cfg.width, cfg.mlp_dim, num_heads=cfg.num_heads,
      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_size, gated=True)
  head = seq if head_positions is None else head_positions
  return blocks + 2 * head * cfg.width * cfg.vocab_size


def init_cache(cfg: LLMConfig, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache of `length` slots, stacked on the layer axis."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.depth, batch, length, cfg.num_kv_heads, cfg.head_size)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "index": jnp.zeros((cfg.depth,), jnp.int32)}


def causal_mask(valid: jax.Array, q_len: int | None = None, offset: int | jax.Array = 0,
                segment_ids: jax.Array | None = None) -> jax.Array:
  """[B, 1, T, S] mask: query t (at slot offset + t) sees the valid keys at slots <= its own.

  valid: [B, S] bool over the key slots; T = q_len (default S). segment_ids
  [B, T] (packed sequences, T = S) keep attention inside the query's segment.
  """
  s = valid.shape[1]
  t = s if q_len is None else q_len
  q_slot = jnp.arange(t)[:, None] + offset
  mask = (jnp.arange(s)[None, :] <= q_slot)[None, None]  # [1, 1, T, S]
  mask = mask & valid[:, None, None, :].astype(bool)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """Positions that count only valid tokens (left padding starts at 0)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


class LLM(nn.Module):
  """Returns (logits [B, T, V], cache or None).

  Pass token `ids` [B, T] or precomputed `embeddings` [B, T, D] (LLaVA splices
  image features into them). Without `mask` (an `attention.AttentionMask` or a
  dense [B, 1, T, S] boolean mask), attention is causal over `padding` (True at
  real tokens, on either side); without `positions`, they count the valid
  tokens.
  """

  config: LLMConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.embed_tokens = layers.Embed(
        cfg.vocab_size, cfg.width, dtype=dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    self.decoder = layers.Stack(
        depth=cfg.depth,
        block_kwargs=dict(num_heads=cfg.num_heads, head_dim=cfg.head_size, mlp_dim=cfg.mlp_dim,
                          num_kv_heads=cfg.num_kv_heads, act="swiglu", norm="rmsnorm",
                          norm_eps=cfg.norm_eps, use_bias=False, rope_theta=cfg.rope_theta,
                          dtype=dtype, attention_impl=cfg.attention_impl),
        scan=cfg.scan, remat=cfg.remat)
    self.norm = layers.RMSNorm(cfg.norm_eps, dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=dtype, dot_general=layers.dense_dot_general,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   ("embed", "vocab")))

  def embed(self, ids: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T, D] input embeddings."""
    return self.embed_tokens(ids)

  def __call__(self, ids: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               padding: jax.Array | None = None, positions: jax.Array | None = None,
               mask: jax.Array | None = None, cache: dict | None = None,
               logits_at: jax.Array | None = None, return_hidden: bool = False):
    """Logits [B, T, V] (and the updated cache); with `logits_at` [B, K] (slot
    indices), only those slots' logits, [B, K, V]: a loss that needs K < T of
    them skips the head's work at the rest. `return_hidden` adds the final
    hidden states [B, T, D] (all slots)."""
    if (ids is None) == (embeddings is None):
      raise ValueError("pass exactly one of ids or embeddings")
    x = self.embed(ids) if embeddings is None else embeddings.astype(jnp.dtype(self.config.dtype))
    b, t = x.shape[:2]
    if positions is None:
      positions = positions_from_valid(jnp.ones((b, t), bool) if padding is None else padding)
    if mask is None:
      if cache is not None:
        raise ValueError("with a KV cache, pass the mask over the cache slots")
      mask = attention.AttentionMask(kv_valid=padding, causal=True)
    x = layers.act_constrain(x)
    x, _, cache = self.decoder(x, mask, positions, cache)
    x = self.norm(x)
    h = x if logits_at is None else layers.take_rows(x, logits_at)
    if self.config.tie_embeddings:
      dtype = jnp.dtype(self.config.dtype)  # h . E^T, as nn.Embed.attend, through contract
      logits = layers.contract(h.astype(dtype), self.embed_tokens.embedding.T.astype(dtype))
    else:
      logits = self.lm_head(h)
    logits = layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))
    if return_hidden:
      return logits, cache, x
    return logits, cache
