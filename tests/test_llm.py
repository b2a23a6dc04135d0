"""The decoder LM: param tree and logical axes, scanned = unrolled, KV-cache
decoding = full recomputation, sampling, and packed LM batches."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.eval import generate as generate_lib
from mmjax.models import layers, llm as llm_lib
from mmjax.data import packing

from conftest import init_params

CFG = llm_lib.llm_config("tiny", vocab_size=50)


def test_size_table_and_param_tree():
  seven = llm_lib.llm_config("7B")
  assert (seven.width, seven.depth, seven.num_heads, seven.mlp_dim, seven.vocab_size) == (
      4096, 32, 32, 11008, 32000)
  model = llm_lib.LLM(CFG)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Every param carries logical axis names.
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), path
  p = nn.unbox(boxed)
  assert set(p) == {"embed_tokens", "decoder", "norm", "lm_head"}
  block = p["decoder"]["layers"]["block"]
  assert block["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
  assert block["attn"]["key"]["kernel"].shape == (2, 32, 2, 8)  # GQA: 2 kv heads
  assert set(block["mlp"]) == {"gate", "up", "down"}
  assert "bias" not in block["attn"]["query"] and "bias" not in block["mlp"]["up"]
  assert p["lm_head"]["kernel"].shape == (32, 50)
  tied = llm_lib.LLM(llm_lib.llm_config("tiny", vocab_size=50, tie_embeddings=True))
  assert "lm_head" not in jax.eval_shape(tied.init, jax.random.key(0),
                                         jnp.zeros((1, 4), jnp.int32))["params"]


def test_scanned_and_unrolled_agree_and_rope_theta_matters():
  ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 50)
  model = llm_lib.LLM(CFG)
  params = init_params(model, ids)
  flat = layers.unstack_layers(params, CFG.depth)
  unrolled = llm_lib.LLM(llm_lib.llm_config("tiny", vocab_size=50, scan=False))
  a = jax.jit(model.apply)({"params": params}, ids)[0]
  b = jax.jit(unrolled.apply)({"params": flat}, ids)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  other = llm_lib.LLM(llm_lib.llm_config("tiny", vocab_size=50, rope_theta=500000.0))
  c = jax.jit(other.apply)({"params": params}, ids)[0]
  assert not np.allclose(a, c, atol=1e-4)


def test_left_padding_does_not_change_a_row():
  model = llm_lib.LLM(CFG)
  ids = jax.random.randint(jax.random.key(2), (1, 5), 3, 50)
  params = init_params(model, ids)
  plain = model.apply({"params": params}, ids)[0]
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
  valid = padded != 0
  out = model.apply({"params": params}, padded, padding=valid)[0]
  np.testing.assert_allclose(out[:, 3:], plain, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("cfg", [CFG, llm_lib.llm_config("tiny", vocab_size=50,
                                                         tie_embeddings=True, scan=False)])
def test_kv_cache_decoding_matches_recomputation(cfg):
  model = llm_lib.LLM(cfg)
  params = init_params(model, jnp.zeros((1, 4), jnp.int32), seed=3)
  # Three prompts: right-padded, left-padded, and full length.
  ids = jnp.array([[1, 7, 9, 11, 0, 0], [0, 0, 1, 5, 6, 8], [1, 4, 4, 9, 13, 21]])
  valid = ids != 0
  emb = model.apply({"params": params}, ids, method=llm_lib.LLM.embed)
  want = generate_lib.generate_without_cache(model, params, emb, valid, 8, eos_id=2)
  gen = generate_lib.make_generate(model, 8, eos_id=2)
  got = gen(params, emb, valid, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got), want)
  assert len(set(map(tuple, want.tolist()))) > 1  # the rows differ: a real check


def test_decoding_stops_at_eos():
  model = llm_lib.LLM(CFG)
  params = init_params(model, jnp.zeros((1, 4), jnp.int32))
  # A zero final norm makes every logit 0, so argmax is token 0: call it EOS.
  params["norm"]["scale"] = jnp.zeros_like(params["norm"]["scale"])
  ids = jnp.array([[1, 5, 6]])
  emb = model.apply({"params": params}, ids, method=llm_lib.LLM.embed)
  out = generate_lib.make_generate(model, 5, eos_id=0, pad_id=9)(
      params, emb, jnp.ones((1, 3), bool), jax.random.key(0))
  assert out.tolist() == [[0, 9, 9, 9, 9]]
  assert generate_lib.trim(out, eos_id=0, pad_id=9) == [[]]


def test_sampling_greedy_and_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
  rng = jax.random.key(0)
  np.testing.assert_array_equal(generate_lib.sample_logits(logits, rng, 0.0, 1.0), [1, 0])
  # top_p small: only the most likely token survives, whatever the temperature.
  for seed in range(5):
    got = generate_lib.sample_logits(logits, jax.random.key(seed), 1.0, 0.05)
    np.testing.assert_array_equal(got, [1, 0])
  # top_p 0.8 keeps {1, 2} in row 0 (0.6 + 0.3 >= 0.8) and never token 0.
  draws = jax.vmap(lambda k: generate_lib.sample_logits(logits, k, 1.0, 0.8))(
      jax.random.split(rng, 200))
  assert set(np.asarray(draws[:, 0]).tolist()) == {1, 2}


def test_packed_text_segments_labels_positions_and_resume():
  docs = [np.array([1] + [10 + i] * n, np.int32) for i, n in enumerate([3, 5, 2, 6, 4, 1])]
  it = packing.PackedText(docs, batch_size=2, seq_len=8, seed=0)
  batch = next(it)
  row = 0
  seg = batch["segments"][row]
  starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
  for s in starts:
    if seg[s] == 0:
      continue
    assert batch["tokens"][row, s] == 1  # each document starts with BOS ...
    assert batch["labels"][row, s] == -100  # ... which is never a target
    assert batch["positions"][row, s] == 0
  assert (batch["labels"][batch["segments"] == 0] == -100).all()
  state = it.get_state()
  after = next(it)
  it2 = packing.PackedText(docs, batch_size=2, seq_len=8, seed=0)
  it2.set_state(state)
  chex.assert_trees_all_equal(next(it2), after)
  # Segments keep attention inside a document.
  mask = llm_lib.causal_mask(jnp.asarray(batch["segments"] > 0),
                             segment_ids=jnp.asarray(batch["segments"]))
  same = batch["segments"][:, :, None] == batch["segments"][:, None, :]
  assert not np.asarray(mask[:, 0])[~same].any()
