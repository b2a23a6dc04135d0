"""Batched decoding with the KV cache: greedy, temperature and top-p sampling.

`make_generate(llm, max_new_tokens, eos_id)` returns one jitted function
(params, embeddings [B, T, D], valid [B, T], rng, temperature, top_p) ->
tokens [B, max_new_tokens]. The prompt is given as embeddings (LLaVA splices
image features into them) with its valid slots, padded on either side: the
prompt fills cache slots 0..T-1 in one pass, token i of the answer goes to slot
T + i at position (valid prompt tokens + i), and the mask hides every padding
slot. A row stops at EOS (later tokens are `pad_id`); the loop stops when
every row has, or after max_new_tokens.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import llm as llm_lib


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """[B, V] -> [B] token ids: argmax when temperature <= 0, else nucleus sampling."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (the first token always).
  keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  sampled = jax.random.categorical(rng, jnp.where(keep, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def make_generate(llm: llm_lib.LLM, max_new_tokens: int, eos_id: int,
                  pad_id: int = 0) -> Callable:
  """A jitted decoder for prompts given as embeddings (see the module docstring)."""
  cfg = llm.config

  def generate(params, embeddings, valid, rng, temperature=0.0, top_p=1.0):
    b, t, _ = embeddings.shape
    slots = t + max_new_tokens
    cache = llm_lib.init_cache(cfg, b, slots)
    kv_valid = jnp.zeros((b, slots), bool).at[:, :t].set(valid.astype(bool))
    positions = llm_lib.positions_from_valid(valid)
    mask = llm_lib.causal_mask(kv_valid, q_len=t)
    logits, cache = llm.apply({"params": params}, embeddings=embeddings, positions=positions,
                              mask=mask, cache=cache)
    # The next token follows each row's last valid prompt slot.
    last = t - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    next_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    next_pos = jnp.sum(valid, axis=1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def cond(carry):
      i, _, _, _, _, done, _, _ = carry
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      i, cache, kv_valid, next_logits, next_pos, done, rng, out = carry
      rng, sub = jax.random.split(rng)
      token = sample_logits(next_logits, sub, temperature, top_p)
      token = jnp.where(done, pad_id, token)
      out = out.at[:, i].set(token)
      done = done | (token == eos_id)
      kv_valid = kv_valid.at[:, t + i].set(True)
      emb = llm.apply({"params": params}, token[:, None], method=llm_lib.LLM.embed)
      logits, cache = llm.apply({"params": params}, embeddings=emb, positions=next_pos[:, None],
                                mask=kv_valid[:, None, None, :], cache=cache)
      return i + 1, cache, kv_valid, logits[:, 0], next_pos + 1, done, rng, out

    carry = (jnp.zeros((), jnp.int32), cache, kv_valid, next_logits, next_pos,
             jnp.zeros((b,), bool), rng, out)
    return jax.lax.while_loop(cond, body, carry)[-1]

  return jax.jit(generate)


def generate_without_cache(llm: llm_lib.LLM, params, embeddings, valid, max_new_tokens: int,
                           eos_id: int, pad_id: int = 0) -> np.ndarray:
  """Greedy decoding that recomputes the whole sequence every step (a reference for tests)."""
  b, t, _ = embeddings.shape
  apply = jax.jit(lambda p, x, m, pos: llm.apply({"params": p}, embeddings=x, mask=m,
                                                 positions=pos)[0])
  x, v = embeddings, jnp.asarray(valid, bool)
  out = np.full((b, max_new_tokens), pad_id, np.int32)
  done = np.zeros((b,), bool)
  for i in range(max_new_tokens):
    logits = apply(params, x, llm_lib.causal_mask(v), llm_lib.positions_from_valid(v))
    last = x.shape[1] - 1 - np.argmax(np.asarray(v)[:, ::-1], axis=1)
    token = np.asarray(jnp.argmax(logits[np.arange(b), last], axis=-1)).astype(np.int32)
    token = np.where(done, pad_id, token)
    out[:, i] = token
    done |= token == eos_id
    emb = llm.apply({"params": params}, jnp.asarray(token)[:, None], method=llm_lib.LLM.embed)
    x = jnp.concatenate([x, emb.astype(x.dtype)], axis=1)
    v = jnp.concatenate([v, jnp.ones((b, 1), bool)], axis=1)
  return out


def trim(tokens, eos_id: int, pad_id: int = 0) -> list[list[int]]:
  """Each row's tokens up to (not including) its first EOS, without padding."""
  rows = []
  for row in np.asarray(tokens):
    ids = []
    for tok in row:
      if tok == eos_id:
        break
      if tok != pad_id:
        ids.append(int(tok))
    rows.append(ids)
  return rows
