"""Contrastive losses whose B x B logit matrix never sits on one device.

The batch is split over the mesh's batch axes (n devices, b = B / n rows each).
Inside `shard_map` every device keeps its own image and text embeddings [b, D]
and passes chunks around a ring with `ppermute`: at ring step r device i holds
the chunk that device (i - r) mod n started with, and computes that [b, b] block
of the global logits. After n steps it has seen its own b rows of the B x B
matrix (and, for the softmax loss, its own b columns), one block at a time. Per
device that is one [b, b] block plus [b, D] chunks; the blocks are recomputed in
the backward pass instead of stored. Softmax (CLIP) combines per-block logsumexps;
sigmoid (SigLIP) sums its blocks, as big_vision's chunked SigLIP does.

Both equal `losses.clip_softmax_loss` / `losses.siglip_loss` (value and
gradients, tests/test_scale_loss.py). With no mesh, or a batch split one way,
they are the plain losses.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax import losses, parallel


def chunked_clip_softmax_loss(image_embeds, text_embeds, logit_scale,
                              axes: Sequence[str] | None = None):
  """Symmetric InfoNCE over s * I @ T^T, computed block by block around a ring.

  image_embeds, text_embeds: global [B, D] (sharded over `axes`, default the
  current mesh's batch axes); logit_scale: []. Returns (loss, None): like
  `losses.clip_softmax_loss`, but no logits exist to return.
  """
  mesh, axes = _mesh_and_axes(axes)
  if mesh is None:
    return losses.clip_softmax_loss(image_embeds, text_embeds, logit_scale)
  n = math.prod(mesh.shape[a] for a in axes)
  batch = image_embeds.shape[0]

  def local(img, txt, scale):  # img, txt: this device's [b, D]
    def block_lse(img_c, txt_c):
      # The logsumexp of my image rows over the chunk's texts, and of my text
      # rows over the chunk's images: [b] each.
      i2t = jax.nn.logsumexp(scale * img @ txt_c.T, axis=1)
      t2i = jax.nn.logsumexp(scale * txt @ img_c.T, axis=1)
      return i2t, t2i

    block_lse = jax.checkpoint(block_lse)  # keep the [b, b] blocks out of the residuals

    def step(chunks, _):
      chunks = _ring_shift(chunks, axes, n)
      return chunks, block_lse(*chunks)

    first = block_lse(img, txt)
    _, rest = jax.lax.scan(step, (img, txt), None, length=n - 1)
    lse_i2t = jax.nn.logsumexp(jnp.concatenate([first[0][None], rest[0]]), axis=0)  # [b]
    lse_t2i = jax.nn.logsumexp(jnp.concatenate([first[1][None], rest[1]]), axis=0)
    positive = scale * jnp.sum(img * txt, axis=-1)  # the diagonal, always local
    total = jnp.sum((lse_i2t - positive) + (lse_t2i - positive)) / 2
    return jax.lax.psum(total, axes) / batch

  return _shard_map(local, mesh, axes)(image_embeds, text_embeds, logit_scale), None


def chunked_siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias,
                        axes: Sequence[str] | None = None):
  """-sum log_sigmoid(z_ij (s I_i.T_j + b)) / B, block by block around a ring; (loss, None)."""
  mesh, axes = _mesh_and_axes(axes)
  if mesh is None:
    return losses.siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias)
  n = math.prod(mesh.shape[a] for a in axes)
  batch = image_embeds.shape[0]

  def local(img, txt, scale, bias):
    me = jax.lax.axis_index(axes)
    eye = jnp.eye(img.shape[0], dtype=img.dtype)

    def block_sum(txt_c, owner):
      logits = scale * img @ txt_c.T + bias  # [b, b]
      labels = jnp.where(owner == me, 2 * eye - 1, -1.0)  # positives only on my own chunk
      return jnp.sum(jax.nn.log_sigmoid(labels * logits))

    block_sum = jax.checkpoint(block_sum)

    def step(txt_c, r):
      txt_c = _ring_shift(txt_c, axes, n)
      return txt_c, block_sum(txt_c, (me - r) % n)

    first = block_sum(txt, me)
    _, rest = jax.lax.scan(step, txt, jnp.arange(1, n))
    return -jax.lax.psum(first + jnp.sum(rest), axes) / batch

  return (_shard_map(local, mesh, axes)(image_embeds, text_embeds, logit_scale, logit_bias),
          None)


def _ring_shift(x, axes, n):
  """Every device sends `x` to the next one along the (flattened) batch axes."""
  return jax.lax.ppermute(x, axes, perm=[(j, (j + 1) % n) for j in range(n)])


def _mesh_and_axes(axes):
  """(the current mesh, the batch axes) or (None, None) where nothing is split."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None, None
  axes = tuple(parallel.batch_axes(mesh) if axes is None else axes)
  if not axes or math.prod(mesh.shape[a] for a in axes) == 1:
    return None, None
  return mesh, axes


def _shard_map(fn, mesh, axes):
  def wrapped(img, txt, *scalars):
    spec = P(axes, None)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec) + (P(),) * len(scalars),
                           out_specs=P())
    return mapped(img, txt, *(jnp.asarray(s, jnp.float32) for s in scalars))
  return wrapped
