"""Softmax attention, by the kernel each backend runs best.

`dot_product_attention(q, k, v, mask, implementation)` computes softmax(q k^T) v
(q scaled by the caller) with one of:

- "cpu": mmjax's own einsum form (below), the fastest here on XLA:CPU;
- "xla": `jax.nn.dot_product_attention`'s XLA path;
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention`, given
  `is_causal` and sequence lengths rather than a dense mask where it can;
- "splash": the Pallas splash attention kernel of TPUs
  (`jax.experimental.pallas.ops.tpu.splash_attention`), its masks static
  (causal, a fixed prefix) and padding and packing as segment ids; on a CPU it
  runs in Pallas' interpret mode, which is how the tests check it;
- "auto" (the models' default): splash on TPU from SPLASH_MIN_LENGTH keys up
  (xla below), cudnn on GPU for 16-bit activations (xla otherwise), cpu on
  CPU, following `mmjax.backend.platform()`.

Masks are `AttentionMask`s, which say what they are (causal, padded, packed)
so that each kernel builds its own form; a dense boolean [B|1, N|1, T, S]
array is still accepted (a KV cache's mask, say): the cpu and jax.nn forms use
it as it is, splash then falls back to the xla form.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmjax import backend

Array = jax.Array

IMPLEMENTATIONS = ("auto", "cpu", "xla", "cudnn", "splash")
_PLATFORMS = {"cudnn": ("gpu",), "splash": ("tpu", "cpu")}  # cpu: Pallas' interpret mode
SPLASH_BLOCK = 128  # splash pads the sequence to a multiple of this
# On TPU "auto" runs splash from this many keys up, XLA's attention below:
# under two blocks the kernel has little to skip and the padding to a block
# and the head-major copies cost more than the [T, T] scores it saves. The
# plans in docs/attention.md compare both forms on each side of it.
SPLASH_MIN_LENGTH = 256


def check_name(name: str | None, where: str = "attention_impl") -> str:
  """The implementation `name` (None means "auto"); a ValueError naming `where`
  for an unknown one."""
  name = "auto" if name is None else name
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{where}={name!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
  return name


def check_runnable(name: str | None, platform: str, where: str = "attention_impl") -> str:
  """`name`, checked against the platform the run compiles for."""
  name = check_name(name, where)
  allowed = _PLATFORMS.get(name)
  if allowed and platform not in allowed:
    raise ValueError(f"{where}={name!r} runs on {' or '.join(allowed)}, and this run compiles "
                     f"for {platform}; use 'auto' or one of cpu, xla")
  return name


def resolve(name: str | None, dtype: Any = jnp.float32, head_dim: int = 64,
            length: int = SPLASH_MIN_LENGTH) -> str:
  """The implementation that `name` means on `backend.platform()` for keys of
  `length` positions."""
  platform = backend.platform()
  name = check_runnable(name, platform)
  if name != "auto":
    return name
  if platform == "tpu":
    return "splash" if length >= SPLASH_MIN_LENGTH else "xla"
  if platform == "gpu":
    # cuDNN's flash kernel takes 16-bit inputs and heads of up to 128, in steps of 8.
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
        and head_dim <= 128
    return "cudnn" if fits else "xla"
  return "cpu"


@struct.dataclass
class AttentionMask:
  """Which keys each query may see, said structurally.

  causal: query t sees keys <= t (self-attention, T = S).
  kv_valid: [B, S] bool, False at padding.
  right_padded: the padding of kv_valid is at the end of each row only (then
    cuDNN takes sequence lengths instead of a mask).
  segment_ids: [B, T] int (packed rows, T = S): a query sees only keys of its
    own segment.
  prefix: with causal, keys < prefix are visible to every query (a prefix-LM).
  """

  kv_valid: Array | None = None
  segment_ids: Array | None = None
  causal: bool = struct.field(pytree_node=False, default=False)
  right_padded: bool = struct.field(pytree_node=False, default=False)
  prefix: int = struct.field(pytree_node=False, default=0)

  def rows(self, q_pos: Array | None, s: int) -> Array | None:
    """The dense [B|1, 1, Q, S] mask of the queries at positions q_pos [B|1, Q]
    (default: every position, Q = S)."""
    if q_pos is None:
      q_pos = jnp.arange(s)[None]
    k_pos = jnp.arange(s)
    mask = None

    def both(a, b):
      return b if a is None else a & b

    if self.causal:
      seen = k_pos[None, None, :] <= q_pos[:, :, None]
      if self.prefix:
        seen = seen | (k_pos < self.prefix)[None, None, :]
      mask = seen[:, None]
    if self.kv_valid is not None:
      mask = both(mask, self.kv_valid.astype(bool)[:, None, None, :])
    if self.segment_ids is not None:
      q_seg = jnp.take_along_axis(self.segment_ids, jnp.broadcast_to(
          q_pos, (self.segment_ids.shape[0], q_pos.shape[1])), axis=1)
      mask = both(mask, (q_seg[:, :, None] == self.segment_ids[:, None, :])[:, None])
    return mask

  def dense(self, s: int) -> Array | None:
    """The dense boolean mask [B|1, 1, S, S] (None when every key is visible)."""
    return self.rows(None, s)


Mask = AttentionMask | Array | None


def dense_mask(mask: Mask, s: int) -> Array | None:
  return mask.dense(s) if isinstance(mask, AttentionMask) else mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Mask = None,
                          implementation: str | None = "auto") -> Array:
  """softmax(q k^T) v, unscaled (scale q first): q [B, T, N, H], k and v
  [B, S, K, H] with K dividing N (GQA). Returns [B, T, N, H]."""
  impl = resolve(implementation, q.dtype, q.shape[-1], k.shape[1])
  if impl == "splash" and not (isinstance(mask, AttentionMask) or mask is None):
    impl = "xla"  # a dense mask: nothing static for the kernel to skip by
  if impl == "splash" and q.shape[1] != k.shape[1]:
    impl = "xla"  # splash here is self-attention
  if impl == "cpu":
    return _cpu(q, k, v, dense_mask(mask, k.shape[1]))
  if impl == "splash":
    return _splash(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=impl,
                                      **_jax_nn_masks(mask, q.shape[1], k.shape[1]))


def _cpu(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """In the heads-major layout [B, K, (N/K) T, S], with the softmax's
  normalisation applied to the [T, H] output rather than the [T, S] weights and
  the row max held constant in the gradient (softmax does not depend on it):
  fewer passes over the scores, which is what XLA:CPU's step time follows
  (`python -m benchmarks.attention` compares it with the xla form)."""
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  # [B, K, G*T, H] against [B, K, S, H]: one batched matmul per kv head.
  q = jnp.transpose(q.reshape(b, t, kv, g, h), (0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
  k, v = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))
  scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], t, s))
    if mask.shape[1] == n:
      mask = mask.reshape(mask.shape[0], kv, g * t, s)
    else:
      mask = jnp.broadcast_to(mask[:, :, None], (mask.shape[0], 1, g, t, s))
      mask = mask.reshape(mask.shape[0], 1, g * t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  top = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  weights = jnp.exp(scores - top)
  total = weights.sum(-1, keepdims=True)  # [B, K, G*T, 1]
  out = jnp.einsum("bkqs,bksh->bkqh", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / total
  out = jnp.transpose(out.reshape(b, kv, g, t, h), (0, 3, 1, 2, 4))
  return out.reshape(b, t, n, h).astype(q.dtype)


def _jax_nn_masks(mask: Mask, t: int, s: int) -> dict[str, Any]:
  """jax.nn.dot_product_attention's mask arguments for `mask`: `is_causal` and
  sequence lengths where they say it all (what cuDNN's kernel skips work by),
  a dense boolean mask only for the rest (packing, left padding, a prefix)."""
  if mask is None:
    return {}
  if not isinstance(mask, AttentionMask):
    return {"mask": mask}
  args: dict[str, Any] = {}
  rest = mask
  if mask.causal and not mask.prefix:
    args["is_causal"] = True
    rest = rest.replace(causal=False)
  if mask.kv_valid is not None and mask.right_padded:
    lengths = mask.kv_valid.astype(jnp.int32).sum(-1)
    args["key_value_seq_lengths"] = lengths
    if t == s:
      args["query_seq_lengths"] = lengths
    rest = rest.replace(kv_valid=None)
  if rest.causal or rest.kv_valid is not None or rest.segment_ids is not None:
    args["mask"] = rest.dense(s)
  return args


# --------------------------------------------------------------------------
# Splash attention (TPU; Pallas' interpret mode elsewhere).

def _splash_kernel(heads: int, length: int, causal: bool, prefix: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  shape = (length, length)
  if causal and prefix:
    k_pos = np.arange(length)
    one = sm.NumpyMask((k_pos[None, :] <= k_pos[:, None]) | (k_pos[None, :] < prefix))
  elif causal:
    one = sm.CausalMask(shape)
  else:
    one = sm.FullMask(shape)
  block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
  """Per example and shard: [N, T, H] heads-major, the sequence padded to a
  multiple of SPLASH_BLOCK. Padding and packing become segment ids: a valid
  token's is its segment (1 unpacked), a padded token's 0, the added tail's -1,
  so every query row sees at least itself and no valid one sees padding."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  mask = mask or AttentionMask()
  b, t, n, _ = q.shape
  kv_heads = k.shape[2]
  length = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  segments = None
  if mask.kv_valid is not None or mask.segment_ids is not None or length != t:
    segments = jnp.ones((b, t), jnp.int32) if mask.segment_ids is None \
        else mask.segment_ids.astype(jnp.int32)
    if mask.kv_valid is not None:
      segments = jnp.where(mask.kv_valid, segments, 0)
    segments = jnp.pad(segments, ((0, 0), (0, length - t)), constant_values=-1)
  q, k, v = (jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - t), (0, 0)))
             for x in (q, k, v))  # [B, N|K, L, H]

  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = _mesh_axes(mesh, "act_batch", (b,))
  head_axes = _mesh_axes(mesh, "act_heads", (n, kv_heads))
  heads_here = n // _axes_size(mesh, head_axes)
  kernel = _splash_kernel(heads_here, length, mask.causal, mask.prefix,
                          backend.platform() != "tpu")

  def per_shard(q, k, v, segments):
    if segments is None:
      return jax.vmap(kernel)(q, k, v)
    ids = sk.SegmentIds(q=segments, kv=segments)
    return jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, ids)

  if batch_axes or head_axes:
    spec = jax.sharding.PartitionSpec(batch_axes, head_axes)
    seg_spec = None if segments is None else jax.sharding.PartitionSpec(batch_axes)
    out = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec, seg_spec),
                        out_specs=spec, check_vma=False)(q, k, v, segments)
  else:
    out = per_shard(q, k, v, segments)
  return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


def _mesh_axes(mesh, logical: str, sizes: tuple[int, ...]) -> tuple[str, ...] | None:
  """The active mesh's axes (of size > 1) that the rules give logical axis
  `logical`, when their product divides every one of `sizes`; else None."""
  if mesh.empty:
    return None
  axes = nn.logical_to_mesh_axes((logical,))[0]
  if axes is None:
    return None
  axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,))
               if mesh.shape.get(a, 1) > 1)
  if not axes or any(size % _axes_size(mesh, axes) for size in sizes):
    return None
  return axes


def _axes_size(mesh, axes: tuple[str, ...] | None) -> int:
  return math.prod(mesh.shape[a] for a in axes) if axes else 1
