"""The CLIP text tower: causality and EOS pooling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params
from mmjax.models.text import TextConfig, TextTransformer, eos_positions

CFG = TextConfig(size="tiny", vocab_size=64, context_length=16, eos_id=2, pad_id=0)


def _ids(seed=0, b=3, t=10):
  return jax.random.randint(jax.random.key(seed), (b, t), 3, 64)


@pytest.fixture(scope="module")
def model_and_params():
  model = TextTransformer(CFG)
  return model, init_params(model, _ids())


def test_causal_output_ignores_later_tokens(model_and_params):
  model, params = model_and_params
  ids = _ids()
  changed = ids.at[:, 6:].set(_ids(seed=1)[:, 6:])
  apply = jax.jit(model.apply)
  tok_a = apply({"params": params}, ids)[1]["tokens"]
  tok_b = apply({"params": params}, changed)[1]["tokens"]
  np.testing.assert_allclose(tok_a[:, :6], tok_b[:, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(tok_a[:, 6:], tok_b[:, 6:])


def test_eos_pooling_on_a_ragged_batch(model_and_params):
  model, params = model_and_params
  ids = np.array(_ids(t=12))
  lengths = [3, 7, 12]
  for row, n in enumerate(lengths):
    ids[row, n - 1] = CFG.eos_id
    ids[row, n:] = CFG.pad_id
  padding = ids != CFG.pad_id
  pooled, out = jax.jit(model.apply)({"params": params}, ids, padding)
  np.testing.assert_array_equal(out["eos_index"], [n - 1 for n in lengths])
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(pooled[row], out["tokens"][row, n - 1])


def test_pooled_output_does_not_see_padding(model_and_params):
  model, params = model_and_params
  ids = np.array(_ids(t=12))
  ids[:, 4] = CFG.eos_id
  ids[:, 5:] = CFG.pad_id
  other = ids.copy()
  other[:, 5:] = 9  # junk after EOS
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply({"params": params}, ids)[0],
                             apply({"params": params}, other)[0], rtol=1e-5, atol=1e-5)


def test_pool_positions_rules():
  ids = jnp.array([[5, 2, 7, 2], [5, 6, 7, 8], [9, 63, 1, 0]])
  np.testing.assert_array_equal(eos_positions(ids, "eos", 2), [1, 3, 3])  # first EOS; none -> last
  np.testing.assert_array_equal(eos_positions(ids, "argmax", 2), [2, 3, 1])
  with pytest.raises(ValueError, match="mean"):
    eos_positions(ids, "mean", 2)


def test_context_length_is_enforced(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="context length 16"):
    model.apply({"params": params}, jnp.ones((1, 17), jnp.int32))


def test_unknown_size():
  with pytest.raises(ValueError, match="XXL"):
    dataclasses.replace(CFG, size="XXL").dims
