"""Shared transformer layers: attention, MLPs, norms, RoPE and the layer stack.

Every param carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `layers`)
and the main activations are constrained with (`act_batch`, `act_len`,
`act_embed`); `mmjax.parallel` maps those names to mesh axes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmjax import backend, parallel
from mmjax.models import attention

Dtype = Any
Array = jax.Array

# Flax's default initialisers, wrapped with logical axis names.
def _part(init: Callable, names: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, names)


def act_constrain(x: Array) -> Array:
  """The standard constraint for a [B, T, D] residual-stream activation."""
  return constrain(x, ("act_batch", "act_len", "act_embed"))


class Embed(nn.Embed):
  """A token embedding whose lookup reads the table whole along `embed`.

  The table is sharded on `embed` (fsdp); a gather from it would give [B, T, D]
  activations sharded on D, which XLA's partitioner cannot turn into the
  batch sharding of the residual stream, nor the gradient back, without
  replicating them ("Involuntary full rematerialization"). Gathering the table
  first, as FSDP does for every weight, keeps the lookup batch-sharded.
  """

  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("token ids must be integers")
    table = constrain(jnp.asarray(self.embedding, self.dtype), ("vocab", None))
    return jnp.take(table, inputs, axis=0)


# --------------------------------------------------------------------------
# Activations and norms.

def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's GELU approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


_SQRT_HALF = math.sqrt(0.5)


def gelu(x: Array) -> Array:
  """The exact GELU as torch computes it, x/2 (1 + erf(x / sqrt 2)).

  jax.nn.gelu(approximate=False) goes through erfc, whose float32 expansion
  evaluates an exp and two branches per element; erf's is one rational
  polynomial. The two agree to 1e-6 on [-10, 10].
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def swiglu(gate: Array, up: Array) -> Array:
  """silu(gate) * up (Llama's gated MLP); with mmjax.backend.cpu_tuning(), as
  `_swiglu_cpu`."""
  if backend.cpu_tuning():
    return _swiglu_cpu(gate, up)
  return jax.nn.silu(gate) * up


@jax.custom_vjp
def _swiglu_cpu(gate: Array, up: Array) -> Array:
  """swiglu with sigmoid(gate) kept for the backward pass: its gradient is
  then products only, no exp per element."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  s = jax.nn.sigmoid(gate)
  return gate * s * up, (gate, up, s)


def _swiglu_bwd(res, g):
  gate, up, s = res
  return g * up * s * (1 + gate * (1 - s)), g * gate * s


_swiglu_cpu.defvjp(_swiglu_fwd, _swiglu_bwd)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _normalise(x: Array, eps: float) -> tuple[Array, Array]:
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  return centred * rstd, rstd


def layer_norm(x: Array, scale: Array, bias: Array | None, eps: float) -> Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis (bias may be
  None). Everything is float32: callers cast x first, and autodiff casts back.
  With mmjax.backend.cpu_tuning(), as `_layer_norm_cpu`."""
  if backend.cpu_tuning():
    return _layer_norm_cpu(x, scale, bias, eps)
  return _layer_norm_fwd(x, scale, bias, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_cpu(x: Array, scale: Array, bias: Array | None, eps: float) -> Array:
  """layer_norm with its backward pass written out: with x_hat the normalised input and
  g' = g * scale, dx = rstd (g' - mean(g') - x_hat mean(g' x_hat)), and
  dscale, dbias are sums over the batch axes. Autodiff of the forward
  materialises the scale broadcast to [..., d] inside XLA:CPU's backward
  fusions; these sums never build it.
  """
  y, _ = _layer_norm_fwd(x, scale, bias, eps)
  return y


def _layer_norm_fwd(x, scale, bias, eps):
  x_hat, rstd = _normalise(x, eps)
  y = x_hat * scale
  if bias is not None:
    y = y + bias
  return y, (x_hat, rstd, scale, bias)


def _layer_norm_bwd(eps, res, g):
  del eps
  x_hat, rstd, scale, bias = res
  batch_axes = tuple(range(g.ndim - 1))
  g_scaled = g * scale
  dx = rstd * (g_scaled - jnp.mean(g_scaled, axis=-1, keepdims=True)
               - x_hat * jnp.mean(g_scaled * x_hat, axis=-1, keepdims=True))
  dscale = jnp.sum(g * x_hat, axis=batch_axes)
  dbias = None if bias is None else jnp.sum(g, axis=batch_axes)
  return dx, dscale, dbias


_layer_norm_cpu.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm in float32 with an explicit eps (CLIP uses 1e-5; Flax defaults to 1e-6)."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", _part(nn.initializers.ones, ("norm",)), (d,), jnp.float32)
    bias = (self.param("bias", _part(nn.initializers.zeros, ("norm",)), (d,), jnp.float32)
            if self.use_bias else None)
    return layer_norm(x.astype(jnp.float32), scale, bias, self.eps).astype(self.dtype)


class RMSNorm(nn.Module):
  """Llama's RMSNorm: normalise in float32, cast back, then scale."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _part(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def make_norm(kind: str, eps: float, dtype: Dtype, name: str | None = None) -> nn.Module:
  if kind == "layernorm":
    return LayerNorm(eps=eps, dtype=dtype, name=name)
  if kind == "rmsnorm":
    return RMSNorm(eps=eps, dtype=dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'")


# --------------------------------------------------------------------------
# Rotary position embedding (split-half convention, as transformers' Llama).

def rope_frequencies(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos, sin of shape [B, T, head_dim] for integer positions [B, T]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [B, T, N, H]; cos/sin: [B, T, H]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> Array:
  """Fixed 2-D sin-cos position embedding [grid * grid, dim] (MAE / MoCo v3):
  a quarter of the channels each for sin and cos of the row and of the column,
  row-major over the grid."""
  if dim % 4:
    raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
  omega = 1.0 / temperature ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))
  rows, cols = jnp.meshgrid(jnp.arange(grid, dtype=jnp.float32),
                            jnp.arange(grid, dtype=jnp.float32), indexing="ij")
  r = rows.reshape(-1, 1) * omega
  c = cols.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(r), jnp.cos(r), jnp.sin(c), jnp.cos(c)], axis=1)


# --------------------------------------------------------------------------
# Masks.

def make_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    padding: Array | None = None,
    causal: bool = False,
    prefix_len: Array | None = None,
) -> Array | None:
  """Boolean mask [B or 1, 1, q_len, kv_len]; True means "may attend".

  padding: [B, kv_len] bool, False at padded keys.
  causal: query t sees keys <= t (queries aligned to the end of the keys).
  prefix_len: [B] int; with causal, keys < prefix_len are visible to every
    query (a prefix-LM: bidirectional over the prefix, causal after it).
  """
  mask = None
  if causal:
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos = jnp.arange(kv_len)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, Tq, Tk]
    if prefix_len is not None:
      in_prefix = k_pos[None] < prefix_len[:, None, None]  # [B, 1, Tk]
      mask = mask | in_prefix[:, None]
  if padding is not None:
    pad = padding.astype(bool)[:, None, None, :]
    mask = pad if mask is None else mask & pad
  return mask


# --------------------------------------------------------------------------
# Matmuls.

def contract(x: Array, kernel: Array, in_dims: int = 1) -> Array:
  """x [..., *K] . kernel [*K, *N] -> [..., *N]: a dense layer's matmul over
  the last `in_dims` dims of x; with mmjax.backend.cpu_tuning(), as `_contract_cpu`."""
  if backend.cpu_tuning():
    return _contract_cpu(x, kernel, in_dims)
  return jnp.tensordot(x, kernel, axes=in_dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract_cpu(x: Array, kernel: Array, in_dims: int = 1) -> Array:
  """contract with its backward pass written out.

  The two gradients are the plain products dy . kernel^T and
  x^T . dy (over the flattened leading dims) of the saved x and kernel. Left
  to autodiff, XLA:CPU fuses the elementwise ops that produced x (a norm's
  scale and shift, the attention output's transposes) into a transposed copy
  of x for the weight gradient, recomputing them in strided order, which is
  several times slower than a plain copy. Here x is saved as it is and the
  product reads it directly. Like any custom_vjp function it has no forward-mode derivative (jax.jvp).
  """
  return jnp.tensordot(x, kernel, axes=in_dims)


def _contract_fwd(x, kernel, in_dims):
  return jnp.tensordot(x, kernel, axes=in_dims), (x, kernel)


def _contract_bwd(in_dims, res, g):
  x, kernel = res
  out_axes = tuple(range(in_dims, kernel.ndim))
  dx = jnp.tensordot(g, kernel, axes=(tuple(range(g.ndim - len(out_axes), g.ndim)), out_axes))
  k, n = math.prod(kernel.shape[:in_dims]), math.prod(kernel.shape[in_dims:])
  dw = jnp.einsum("mk,mn->kn", x.reshape(-1, k), g.reshape(-1, n))
  return dx.astype(x.dtype), dw.reshape(kernel.shape).astype(kernel.dtype)


_contract_cpu.defvjp(_contract_fwd, _contract_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`nn.Dense(dot_general=dense_dot_general)`: its matmul through `contract`
  (any other contraction, or an explicit precision, goes to lax.dot_general)."""
  (lhs_c, rhs_c), (lhs_b, _) = dimension_numbers
  n = len(lhs_c)
  if (precision is None and preferred_element_type is None and not lhs_b
      and tuple(lhs_c) == tuple(range(lhs.ndim - n, lhs.ndim)) and tuple(rhs_c) == tuple(range(n))):
    return contract(lhs, rhs, n)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


# --------------------------------------------------------------------------
# Attention.

class DenseND(nn.Module):
  """y = x . kernel, contracting the last `in_dims` dims of x.

  Used for the head-shaped projections ([D] -> [N, H] and [N, H] -> [D]): flax's
  DenseGeneral reshapes a boxed kernel in a way that breaks logical constraints
  under an active mesh, and a kernel stored in its true shape converts cleanly.
  """

  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]  # logical names of the kernel's dims (in + out)
  in_dims: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _dense_params(self, x.shape[x.ndim - self.in_dims:], self.out_shape,
                                 self.names, self.use_bias)
    y = contract(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y


def _dense_params(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                  names: tuple[str | None, ...], use_bias: bool) -> tuple[Array, Array | None]:
  """The float32 kernel [*in_shape, *out_shape] (lecun-normal over the in dims)
  and bias [*out_shape] (zeros; None without) of `module`, as DenseND stores them."""
  n_in, n_out = len(in_shape), len(out_shape)
  init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)),
                                      out_axis=tuple(range(n_in, n_in + n_out)))
  kernel = module.param("kernel", _part(init, names), (*in_shape, *out_shape), jnp.float32)
  bias = module.param("bias", _part(nn.initializers.zeros, names[n_in:]), out_shape,
                      jnp.float32) if use_bias else None
  return kernel, bias


def take_rows(x: Array, index: Array) -> Array:
  """x [B, T, ...] at positions index [B, Q] -> [B, Q, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class _Projection(nn.Module):
  """The kernel [D, *out_shape] (and bias) of one head-shaped projection, stored
  as DenseND stores them, for Attention and MLP to apply several in one matmul."""

  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]
  use_bias: bool = True

  @nn.compact
  def __call__(self, in_dim: int) -> tuple[Array, Array | None]:
    return _dense_params(self, (in_dim,), self.out_shape, self.names, self.use_bias)


def _project(x: Array, parts: list[tuple[Array, Array | None]], dtype: Dtype) -> list[Array]:
  """x [B, T, D] through kernels [D, N, H] of equal shape, as one matmul."""
  kernel = jnp.stack([k for k, _ in parts], axis=1).astype(dtype)  # [D, P, N, H]
  y = contract(x.astype(dtype), kernel)  # [B, T, P, N, H]
  if parts[0][1] is not None:
    y = y + jnp.stack([b for _, b in parts]).astype(dtype)
  return [y[:, :, i] for i in range(len(parts))]


def _project_each(x: Array, parts: list[tuple[Array, Array | None]], dtype: Dtype) -> list[Array]:
  """x [..., D] through each kernel [D, F] (and bias) on its own."""
  out = []
  for kernel, bias in parts:
    y = contract(x.astype(dtype), kernel.astype(dtype))
    out.append(y if bias is None else y + bias.astype(dtype))
  return out


def _project_side_by_side(x: Array, parts: list[tuple[Array, Array | None]],
                          dtype: Dtype, axis_name: str) -> list[Array]:
  """x [..., D] through kernels [D, F] of equal shape as one [D, P F] matmul
  under mmjax.backend.cpu_tuning() (else each on its own).

  SwiGLU's gate and up projections: as two matmuls, XLA:CPU writes each
  elementwise gradient transposed for its weight update, a slow strided
  fusion; one matmul over the kernels side by side avoids it (1.15x on the
  LLaVA benchmark's step). Concatenated kernels are fastest, but where the
  active mesh shards F (`axis_name`) their halves would no longer line up with
  the shards, so there the P outputs are interleaved along the last axis
  instead, which keeps every column on the shard of its F index.
  """
  if not backend.cpu_tuning():
    return _project_each(x, parts, dtype)
  if parallel.logical_axis_size(axis_name) == 1:
    kernel = jnp.concatenate([k for k, _ in parts], axis=-1).astype(dtype)  # [D, P F]
    y = contract(x.astype(dtype), kernel)
    if parts[0][1] is not None:
      y = y + jnp.concatenate([b for _, b in parts]).astype(dtype)
    return jnp.split(y, len(parts), axis=-1)
  kernel = jnp.stack([k for k, _ in parts], axis=-1).astype(dtype)  # [D, F, P]
  y = contract(x.astype(dtype), kernel)
  if parts[0][1] is not None:
    y = y + jnp.stack([b for _, b in parts], axis=-1).astype(dtype)
  return [y[..., i] for i in range(len(parts))]


def _name_heads(x: Array, name: str) -> Array:
  """checkpoint_name on [B, T, N, H] seen as [B, T, N * H]: a copy that remat
  keeps then has N * H as its minor dim (TPU tiles pad a minor dim of 64 to
  128, doubling what a kept ViT's q, k, v or attention output costs)."""
  return checkpoint_name(x.reshape(*x.shape[:2], -1), name).reshape(x.shape)


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention (`attention.dot_product_attention`,
  by `attention_impl`; `mask` an `attention.AttentionMask` or a dense boolean mask).

  With `num_kv_heads < num_heads` keys and values are shared across groups of
  query heads (GQA). With `rope_theta` set, rotary embeddings are applied to
  queries and keys at `positions`. Queries, keys and values are projected in
  one matmul (keys and values in one under GQA); their params stay separate
  (`query`, `key`, `value`), as checkpoints name them.

  With `query_index` [B, Q] only those positions ask: queries are projected
  there alone and the output is [B, Q, D], while keys and values come from
  every position (a pooled model's last layer needs no other output).
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  use_bias: bool = True
  rope_theta: float | None = None
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see mmjax.models.attention
  # Also sow the softmax weights [B, N, T, S] as intermediates/attention (for
  # figures; the output is still computed by dot_product_attention).
  sow_weights: bool = False

  @nn.compact
  def __call__(
      self,
      x: Array,
      mask: attention.Mask = None,
      positions: Array | None = None,
      cache: dict[str, Array] | None = None,
      query_index: Array | None = None,
  ) -> tuple[Array, dict[str, Array] | None]:
    """x: [B, T, D]. With `cache` ({"k", "v": [B, S, K, H], "index": int32 []}),
    writes this step's keys/values at `index` and attends over the whole cache
    (the caller passes the mask for the valid cache positions)."""
    if query_index is not None and cache is not None:
      raise ValueError("Attention: query_index and a KV cache do not combine")
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv_heads}")
    proj = functools.partial(_Projection, use_bias=self.use_bias, names=("embed", "heads", "kv"))
    d = x.shape[-1]
    parts = [proj((self.num_heads, self.head_dim), name="query")(d),
             proj((kv_heads, self.head_dim), name="key")(d),
             proj((kv_heads, self.head_dim), name="value")(d)]
    if query_index is not None:
      (q,) = _project(take_rows(x, query_index), parts[:1], self.dtype)
      k, v = _project(x, parts[1:], self.dtype)
    elif kv_heads == self.num_heads:
      q, k, v = _project(x, parts, self.dtype)
    else:
      (q,), (k, v) = _project(x, parts[:1], self.dtype), _project(x, parts[1:], self.dtype)
    q = constrain(q, ("act_batch", "act_len", "act_heads", "act_kv"))
    q, k, v = (_name_heads(t, "qkv") for t in (q, k, v))
    if self.rope_theta is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      cos, sin = rope_frequencies(positions, self.head_dim, self.rope_theta)
      k = apply_rope(k, cos, sin)
      if query_index is not None:
        cos, sin = (take_rows(c, query_index) for c in (cos, sin))
      q = apply_rope(q, cos, sin)
    if query_index is not None and isinstance(mask, attention.AttentionMask):
      mask = mask.rows(query_index, x.shape[1])
    elif query_index is not None and mask is not None:
      mask = jnp.asarray(mask)
      if mask.shape[2] != 1:  # the mask's rows of the asking positions
        mask = jnp.broadcast_to(mask, (x.shape[0], *mask.shape[1:]))
        mask = jnp.take_along_axis(mask, query_index[:, None, :, None], axis=2)

    new_cache = None
    if cache is not None:
      index = cache["index"]
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
      new_cache = {"k": k, "v": v, "index": index + x.shape[1]}

    if self.sow_weights:
      self.sow("intermediates", "attention",
               attention_weights(q, k, attention.dense_mask(mask, k.shape[1])))
    # Scaling the queries ([B, T, N, H]) costs less than scaling the scores ([B, N, T, S]).
    q = q * jnp.asarray(1.0 / math.sqrt(self.head_dim), q.dtype)
    out = attention.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                          self.attention_impl)
    out = _name_heads(out, "attn_out")  # [B, T, N, H]
    out = DenseND((x.shape[-1],), ("heads", "kv", "embed"), in_dims=2, use_bias=self.use_bias,
                  dtype=self.dtype, name="out")(out)
    return out, new_cache


def attention_weights(q: Array, k: Array, mask: Array | None = None) -> Array:
  """The softmax weights of dot_product_attention, in float32: [B, N, T, S].

  q: [B, T, N, H]; k: [B, S, K, H] with K dividing N (GQA); mask as for
  dot_product_attention (True = may attend).
  """
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32))
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


# --------------------------------------------------------------------------
# MLPs.

class MLP(nn.Module):
  """Two-layer MLP (`gelu`, `quick_gelu`, ...) or the gated SwiGLU of Llama."""

  hidden_dim: int
  act: str = "gelu"
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    init = nn.initializers.lecun_normal()
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                              dot_general=dense_dot_general)
    if self.act == "swiglu":
      proj = functools.partial(_Projection, (self.hidden_dim,), ("embed", "mlp"), self.use_bias)
      gate, up = _project_side_by_side(x, [proj(name="gate")(d), proj(name="up")(d)],
                                       self.dtype, "mlp")
      h = swiglu(checkpoint_name(gate, "mlp_hidden"), checkpoint_name(up, "mlp_hidden"))
    else:
      h = dense(self.hidden_dim, name="fc1",
                kernel_init=_part(init, ("embed", "mlp")),
                bias_init=_part(nn.initializers.zeros, ("mlp",)))(x)
      h = activation(self.act)(checkpoint_name(h, "mlp_hidden"))
    h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    return dense(d, name="fc2" if self.act != "swiglu" else "down",
                 kernel_init=_part(init, ("mlp", "embed")),
                 bias_init=_part(nn.initializers.zeros, ("embed",)))(h)


# --------------------------------------------------------------------------
# The pre-LN block and the stack.

class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: int | None = None
  act: str = "gelu"
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  use_bias: bool = True
  rope_theta: float | None = None
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  sow_attention: bool = False  # see Attention.sow_weights

  @nn.compact
  def __call__(self, x, mask=None, positions=None, cache=None, query_index=None):
    """With `query_index` [B, Q], the output is the block's at those positions
    only, [B, Q, D] (their queries attend over every position)."""
    h = make_norm(self.norm, self.norm_eps, self.dtype, name="norm1")(x)
    h, new_cache = Attention(
        num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
        use_bias=self.use_bias, rope_theta=self.rope_theta, dtype=self.dtype,
        attention_impl=self.attention_impl, sow_weights=self.sow_attention,
        name="attn")(h, mask, positions, cache, query_index)
    if query_index is not None:
      x = take_rows(x, query_index)
    x = checkpoint_name(act_constrain(x + h), "residual")
    h = checkpoint_name(make_norm(self.norm, self.norm_eps, self.dtype, name="norm2")(x), "mlp_in")
    h = MLP(self.mlp_dim, act=self.act, use_bias=self.use_bias, dtype=self.dtype, name="mlp")(h)
    return act_constrain(x + h), new_cache


# The activations a block names (jax.ad_checkpoint.checkpoint_name), for a
# remat policy to keep: q, k and v after their projection [B, T, N, H] each;
# the attention's output before its projection [B, T, N, H]; the residual
# stream after attention [B, T, D]; the MLP's input (after its norm) [B, T, D]
# and its hidden layer before the activation [B, T, F] (gate and up, SwiGLU).
REMAT_NAMES = ("qkv", "attn_out", "residual", "mlp_in", "mlp_hidden")

REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}
# Presets that keep named activations ("save:NAME,..." keeps any list).
REMAT_SAVE_PRESETS: dict[str, tuple[str, ...]] = {
    # The attention's projections and output: the backward recomputes the norms,
    # the scores and the MLP (whose hidden layer is the largest activation).
    "save_attention": ("qkv", "attn_out"),
    # Every weight matmul's input or output but the MLP hidden layer.
    "save_all_but_mlp_hidden": ("qkv", "attn_out", "residual", "mlp_in"),
}


def remat_policy(name: str):
  """A policy for jax.checkpoint: "full", "dots", "dots_no_batch",
  "nothing_saveable", a preset of REMAT_SAVE_PRESETS, or "save:NAME,NAME"
  keeping the named activations (REMAT_NAMES) and recomputing the rest."""
  if name.startswith("save:") or name in REMAT_SAVE_PRESETS:
    names = REMAT_SAVE_PRESETS.get(name) or tuple(n for n in name[5:].split(",") if n)
    unknown = sorted(set(names) - set(REMAT_NAMES))
    if unknown or not names:
      raise ValueError(f"remat {name!r}: unknown activation names {unknown}; a block names "
                       f"{list(REMAT_NAMES)}")
    return jax.checkpoint_policies.save_only_these_names(*names)
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; choose 'none', one of "
                     f"{sorted(REMAT_POLICIES) + sorted(REMAT_SAVE_PRESETS)}, or "
                     f"'save:NAME,...' with names from {list(REMAT_NAMES)}")
  return REMAT_POLICIES[name]


class _ScanBody(nn.Module):
  """Adapts a Block to nn.scan's (carry, xs) -> (carry, ys) signature."""

  block_kwargs: dict
  collect: bool = False

  @nn.compact
  def __call__(self, carry, cache, mask, positions, query_index=None):
    x, new_cache = Block(**self.block_kwargs, name="block")(carry, mask, positions, cache,
                                                           query_index)
    return x, (x if self.collect else None, new_cache)


class Stack(nn.Module):
  """`depth` identical blocks, scanned (params stacked on `layers`) or unrolled.

  Returns (x, hidden, cache): `hidden` is [depth, B, T, D], every block's output
  in order, when `collect_hidden`; `cache` is the updated KV cache (stacked on
  the layer axis) when one was given.

  `query_index` [B, Q] asks for the output at those positions only ([B, Q, D]).
  An unrolled stack then runs its last block there alone, which is all that a
  model pooled at one token needs; a scanned one runs every block on every
  position and takes the rows at the end.
  """

  depth: int
  block_kwargs: dict
  scan: bool = True
  remat: str = "none"
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, x, mask=None, positions=None, cache=None, query_index=None):
    if query_index is not None and (self.collect_hidden or cache is not None):
      raise ValueError("Stack: query_index does not combine with collect_hidden or a KV cache")
    body = _ScanBody
    if self.remat != "none":
      body = nn.remat(body, policy=remat_policy(self.remat), prevent_cse=not self.scan)
    if self.scan:
      scanned = nn.scan(
          body,
          # Sown intermediates (attention weights) come out stacked on the layer axis.
          variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast),
          length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, (hidden, new_cache) = scanned(self.block_kwargs, self.collect_hidden, name="layers")(
          x, cache, mask, positions)
      if query_index is not None:
        x = take_rows(x, query_index)
      return x, hidden, new_cache

    hidden, caches = [], []
    for i in range(self.depth):
      layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
      last = query_index if i == self.depth - 1 else None
      x, (h, c) = body(self.block_kwargs, self.collect_hidden, name=f"layers_{i}")(
          x, layer_cache, mask, positions, last)
      hidden.append(h)
      caches.append(c)
    hidden = jnp.stack(hidden) if self.collect_hidden else None
    new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
    return x, hidden, new_cache


def stack_forward_flops(depth: int, seq: int, width: int, mlp_dim: int, *,
                        num_heads: int | None = None, num_kv_heads: int | None = None,
                        head_dim: int | None = None, gated: bool = False,
                        kv_len: int | None = None, last_queries: int | None = None) -> float:
  """Forward FLOPs of `depth` blocks on one sequence (2 FLOPs per multiply-add).

  Projections 2*S*D*(N + 2K + N)*H, the MLP 2*S*D*F per matrix (3 matrices when
  gated), scores and weighted sum 4*S*S_kv*N*H. For MHA with F = 4D this is
  L * (24 S D^2 + 4 S^2 D), the ViT count of the reference. With
  `last_queries` = Q the last block runs at Q positions only (`Stack`'s
  `query_index`): keys and values at all S, the rest at Q.
  """
  num_heads = num_heads or 1
  head_dim = head_dim or width // num_heads
  kv = num_kv_heads or num_heads
  kv_len = kv_len or seq

  def block(q: int) -> float:
    proj = 2 * width * head_dim * (2 * num_heads * q + 2 * kv * seq)
    return proj + 4 * q * kv_len * num_heads * head_dim + 2 * q * width * mlp_dim * (3 if gated else 2)

  if last_queries is None:
    return float(depth * block(seq))
  return float((depth - 1) * block(seq) + block(last_queries))


def unstack_layers(params: dict, depth: int, key: str = "layers") -> dict:
  """Scanned params ({key: leaves [depth, ...]}) -> unrolled ({key_i: ...})."""
  out = {}
  for name, value in params.items():
    if name == key:
      for i in range(depth):
        out[f"{key}_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    elif isinstance(value, dict):
      out[name] = unstack_layers(value, depth, key)
    else:
      out[name] = value
  return out


def stack_layers(params: dict, depth: int, key: str = "layers") -> dict:
  """Unrolled params ({key_i: ...}) -> scanned ({key: leaves [depth, ...]})."""
  out = {}
  names = set(params)
  if f"{key}_0" in names:
    out[key] = jax.tree.map(lambda *a: jnp.stack(a), *[params[f"{key}_{i}"] for i in range(depth)])
    names -= {f"{key}_{i}" for i in range(depth)}
  for name in names:
    value = params[name]
    out[name] = stack_layers(value, depth, key) if isinstance(value, dict) else value
  return out
