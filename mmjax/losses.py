"""Losses: CLIP's softmax InfoNCE, SigLIP's sigmoid loss, masked next-token CE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def clip_softmax_loss(image_embeds, text_embeds, logit_scale):
  """Symmetric InfoNCE over the N x N logits of L2-normalised features.

  L = (1/N) sum_i (l(I_i) + l(T_i)) / 2, l(I_i) = -log softmax_j(s I_i.T_j)[i].
  Returns (loss, logits [N, N]) with logits = s * I @ T^T.
  """
  logits = logit_scale * jnp.einsum("id,jd->ij", image_embeds, text_embeds)
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return jnp.mean((i2t + t2i) / 2), logits


def siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias):
  """-sum log_sigmoid(z_ij (s I_i.T_j + b)) / N with z = +1 on the diagonal, -1 off it."""
  logits = logit_scale * jnp.einsum("id,jd->ij", image_embeds, text_embeds) + logit_bias
  n = logits.shape[0]
  labels = 2 * jnp.eye(n) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n, logits


def shift_labels(labels, ignore_index: int = IGNORE_INDEX):
  """labels [B, T] -> the label of the next position, [B, T]: labels[:, 1:]
  then `ignore_index`. Position t's logits predict token t + 1, so the loss
  takes all T positions' logits as they are: slicing off the last one,
  `logits[:, :-1]`, would copy the [B, T, V] logits forward and pad their
  gradient backward."""
  return jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=ignore_index)


def next_token_loss(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Mean cross-entropy over positions whose label is not `ignore_index`.

  logits: [B, T, V] predicting labels [B, T] (already shifted by the caller).
  Returns (loss, number of counted tokens).
  """
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  count = jnp.sum(valid)
  return jnp.sum(ce * valid) / jnp.maximum(count, 1), count
