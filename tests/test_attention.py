"""mmjax.models.attention: one structured mask, each backend's form. Splash
runs here in Pallas' interpret mode; cuDNN's arguments are checked through
jax.nn's XLA path."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import backend
from mmjax.models import attention
from mmjax.models.vit import ViTConfig
from mmjax.train import loop


def _qkv(b, t, n, kv, h, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) / np.sqrt(h)
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32) for _ in range(2))
  return q, k, v


def _used_rows(mask, b, t):
  """[B, T, 1, 1]: 1 at the queries whose output a model uses: a real token
  (not padding) that sees at least one key. Padded queries' outputs differ
  between the forms (cuDNN zeroes them, splash lets padding see padding) and
  no model reads them."""
  dense = attention.dense_mask(mask, t)
  if dense is None:
    return jnp.ones((b, t, 1, 1))
  rows = jnp.broadcast_to(dense, (b, 1, t, t)).any(-1)[:, 0]
  if isinstance(mask, attention.AttentionMask) and mask.kv_valid is not None:
    rows = rows & mask.kv_valid
  return rows[:, :, None, None].astype(jnp.float32)


def _values_and_grads(impl, q, k, v, mask):
  """Outputs and input gradients under a cotangent that is zero at the rows
  no model uses (`_used_rows`)."""
  rows = _used_rows(mask, q.shape[0], q.shape[1])
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * rows
  out, vjp = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl), q, k, v)
  return out * rows, vjp(cotangent)


T = 20  # not a multiple of the kernel's block: padded inside the call
ROWS = np.arange(T)[None]
CASES = {
    # A ViT: bidirectional, nothing masked.
    "vit": (4, 4, None),
    # The text tower: causal, right padding.
    "text": (4, 4, lambda: attention.AttentionMask(
        kv_valid=jnp.asarray(ROWS < np.array([[T], [13]])), causal=True, right_padded=True)),
    # The LLM: causal, GQA 4:1, left padding.
    "llm": (8, 2, lambda: attention.AttentionMask(
        kv_valid=jnp.asarray(ROWS >= np.array([[0], [5]])), causal=True)),
    # A prefix-LM: the first 6 positions see each other.
    "prefix": (4, 4, lambda: attention.AttentionMask(causal=True, prefix=6)),
    # Packed rows: three segments, then padding.
    "packed": (4, 2, lambda: attention.AttentionMask(
        kv_valid=jnp.asarray(ROWS < 17), causal=True,
        segment_ids=jnp.asarray(1 + (ROWS >= 6) + (ROWS >= np.array([[11], [14]])),
                                jnp.int32))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_agrees_with_the_cpu_form_in_values_and_gradients(case):
  n, kv, make_mask = CASES[case]
  mask = make_mask() if make_mask else None
  q, k, v = _qkv(2, T, n, kv, 16)
  want = _values_and_grads("cpu", q, k, v, mask)
  got = _values_and_grads("splash", q, k, v, mask)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_the_structured_mask_is_the_dense_mask_it_describes():
  from mmjax.models import layers, llm
  valid = jnp.asarray(ROWS >= np.array([[0], [5]]))
  np.testing.assert_array_equal(
      attention.AttentionMask(kv_valid=valid, causal=True).dense(T), llm.causal_mask(valid))
  prefix = layers.make_attention_mask(T, T, causal=True, prefix_len=jnp.array([6]))
  np.testing.assert_array_equal(attention.AttentionMask(causal=True, prefix=6).dense(T), prefix)
  # The rows of chosen query positions (a decode step's) are the dense mask's rows.
  m = attention.AttentionMask(kv_valid=valid, causal=True)
  at = jnp.array([[3, 19], [7, 8]])
  np.testing.assert_array_equal(m.rows(at, T),
                                jnp.take_along_axis(m.dense(T)[:, 0], at[:, :, None], 1)[:, None])


@pytest.mark.parametrize("case", ["text", "llm", "packed"])
def test_the_arguments_handed_to_cudnn_give_the_dense_masks_result(case):
  """Causal + right padding go as is_causal and sequence lengths (what cuDNN
  skips work by); the rest as a dense mask. Run through jax.nn's XLA path."""
  n, kv, make_mask = CASES[case]
  mask = make_mask()
  args = attention._jax_nn_masks(mask, T, T)
  if case == "text":
    assert args["is_causal"] and "mask" not in args
    np.testing.assert_array_equal(args["key_value_seq_lengths"], [T, 13])
  else:
    assert "mask" in args
  q, k, v = _qkv(2, T, n, kv, 16)
  rows = _used_rows(mask, 2, T)
  got = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla", **args) * rows
  want = attention.dot_product_attention(q, k, v, mask, "cpu") * rows
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_auto_follows_the_platform_the_run_compiles_for():
  assert backend.platform() == "cpu" and attention.resolve("auto") == "cpu"
  tpu = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5p")]
  gpu = [types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100")]
  with backend.compiling_for(tpu):
    assert attention.resolve(None) == "splash"  # 256 keys and more
    assert attention.resolve(None, length=257) == "splash"
    assert attention.resolve(None, length=197) == "xla"  # a B/16's tokens: XLA's attention
  with backend.compiling_for(gpu):
    assert attention.resolve("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention.resolve("auto", jnp.float32, 64) == "xla"  # cuDNN's kernel is 16-bit
  assert backend.platform() == "cpu"


def test_unknown_or_unrunnable_forms_are_config_errors_naming_the_key():
  with pytest.raises(ValueError, match="ViTConfig.attention_impl='flash'"):
    ViTConfig(attention_impl="flash")
  model = {"vision": {"attention_impl": "cudnn"}, "text": {"attention_impl": "auto"}}
  with pytest.raises(ValueError, match=r"--config\.model\.vision\.attention_impl='cudnn' runs on gpu"):
    loop.check_attention(model, "cpu")
  loop.check_attention(model, "gpu")


@pytest.mark.parametrize("name", ["clip_shapes", "clip_vit_b16", "clip_vit_l14", "siglip_b16",
                                  "llava_shapes", "llava15_7b", "lm_shapes", "vit_digits"])
def test_every_tower_of_the_experiments_can_choose_its_attention(name):
  """--config.model.{vision,text,llm}.attention_impl=... works on the locked
  config only where the key exists: every tower has it, set to auto."""
  import importlib
  c = importlib.import_module(f"experiments.{name}").get_config()
  towers = [c.model[t] for t in ("vision", "text", "llm") if t in c.model]
  assert towers and all(t["attention_impl"] == "auto" for t in towers)
