"""ViT: variants, patchify, pooling, named intermediates, posemb resampling, dtypes."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params
from mmjax.models import vit
from mmjax.models.vit import ViT, ViTConfig

TINY = ViTConfig(variant="tiny/8", image_size=32)


def _images(b=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


@pytest.mark.parametrize("variant,width,depth,heads,patch", [
    ("Ti/16", 192, 12, 3, 16), ("S/16", 384, 12, 6, 16), ("B/32", 768, 12, 12, 32),
    ("B/16", 768, 12, 12, 16), ("L/14", 1024, 24, 16, 14), ("H/14", 1280, 32, 16, 14),
    ("g/14", 1408, 40, 16, 14),
])
def test_variant_table(variant, width, depth, heads, patch):
  size = vit.decode_variant(variant)
  assert (size["width"], size["depth"], size["num_heads"], size["patch_size"]) == (
      width, depth, heads, patch)
  assert size["width"] % size["num_heads"] == 0


def test_bad_variant_names_the_problem():
  with pytest.raises(ValueError, match="Q/16"):
    vit.decode_variant("Q/16")


def test_vit_b16_param_count():
  """ViT-B/16 at 224 px has 86.6M params with a 1000-class head (ViT paper: 86M)."""
  cfg = ViTConfig(variant="B/16", image_size=224, num_classes=1000)
  shapes = jax.eval_shape(ViT(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(jax.tree.map(lambda b: b, shapes)))
  assert 86.0e6 < n < 87.0e6, n


def test_patchify_order():
  img = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  patches = vit.patchify(jnp.asarray(img), 2)
  assert patches.shape == (2, 4, 12)
  # Patch 1 is the top-right 2x2 block, flattened row by row then channel.
  np.testing.assert_array_equal(patches[0, 1], img[0, 0:2, 2:4].reshape(-1))
  np.testing.assert_array_equal(patches[1, 2], img[1, 2:4, 0:2].reshape(-1))
  with pytest.raises(ValueError, match="divisible"):
    vit.patchify(jnp.zeros((1, 5, 5, 3)), 2)


@pytest.mark.parametrize("pool,prefix", [("cls", 1), ("gap", 0), ("map", 0)])
def test_pooling_shapes(pool, prefix):
  cfg = dataclasses.replace(TINY, pool=pool, num_prefix_tokens=prefix)
  model = ViT(cfg)
  params = init_params(model, _images())
  pooled, out = jax.jit(model.apply)({"params": params}, _images())
  assert pooled.shape == (2, 32)
  assert out["tokens"].shape == (2, 16 + prefix, 32)
  if pool == "cls":
    np.testing.assert_allclose(pooled, out["tokens"][:, 0])
  if pool == "gap":
    np.testing.assert_allclose(pooled, out["tokens"].mean(1), rtol=1e-5, atol=1e-6)


def test_hidden_states_named_like_transformers():
  cfg = dataclasses.replace(TINY, pre_norm=True)
  model = ViT(cfg, collect_hidden=True)
  params = init_params(model, _images())
  _, out = jax.jit(model.apply)({"params": params}, _images())
  hidden = out["hidden_states"]
  assert hidden.shape == (3, 2, 17, 32)  # embeddings + 2 blocks
  # Entry 0 is after the pre-norm: zero mean, unit variance per token.
  np.testing.assert_allclose(hidden[0].mean(-1), 0, atol=1e-5)
  # The final norm of the last entry is the token output.
  ln = params["final_norm"]
  last = np.asarray(hidden[-1])
  ref = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + cfg.norm_eps)
  np.testing.assert_allclose(out["tokens"], ref * ln["scale"] + ln["bias"], rtol=1e-4, atol=1e-4)


def test_classification_head_and_size_check():
  cfg = dataclasses.replace(TINY, num_classes=10)
  model = ViT(cfg)
  params = init_params(model, _images())
  logits, out = jax.jit(model.apply)({"params": params}, _images())
  assert logits.shape == (2, 10) and out["pre_logits"].shape == (2, 32)
  with pytest.raises(ValueError, match="32px"):
    model.apply({"params": params}, _images(size=64))


def test_conv_stem_gives_the_same_token_grid():
  cfg = dataclasses.replace(TINY, stem="conv")
  model = ViT(cfg)
  params = init_params(model, _images())
  assert "stem" in params and "patch_embed" not in params
  _, out = jax.jit(model.apply)({"params": params}, _images())
  assert out["tokens"].shape == (2, 17, 32)


def test_resample_posemb():
  posemb = jax.random.normal(jax.random.key(0), (1 + 16, 8))
  same = vit.resample_posemb(posemb, 4)
  np.testing.assert_array_equal(same, posemb)
  bigger = vit.resample_posemb(posemb, 8)
  assert bigger.shape == (1 + 64, 8)
  np.testing.assert_array_equal(bigger[0], posemb[0])  # class token kept
  # A constant grid stays constant under resampling.
  flat = jnp.concatenate([posemb[:1], jnp.ones((16, 8))])
  np.testing.assert_allclose(vit.resample_posemb(flat, 6)[1:], 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="square"):
    vit.resample_posemb(posemb[:-1], 4)


def test_bfloat16_compute_float32_params_close_to_float32():
  x = _images()
  f32 = ViT(TINY)
  params = init_params(f32, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  bf16 = ViT(dataclasses.replace(TINY, dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init_params(bf16, x)))
  y32, _ = jax.jit(f32.apply)({"params": params}, x)
  y16, out16 = jax.jit(bf16.apply)({"params": params}, x)
  assert out16["tokens"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1)
  assert not np.array_equal(np.asarray(y16, np.float32), y32)


def test_repeated_calls_compile_once():
  model = ViT(TINY)
  params = init_params(model, _images())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(p, x):
    return model.apply({"params": p}, x)[0]

  for seed in range(3):
    forward(params, _images(seed=seed))
  with pytest.raises(AssertionError):
    forward(params, _images(b=3))  # a new shape retraces, and the guard catches it
