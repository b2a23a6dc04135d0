"""Shared layers: activations, norms, RoPE, masks, attention, the layer stack."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from conftest import init_params
from mmjax import backend
from mmjax.models import attention, layers


def test_quick_gelu_formula():
  x = jnp.linspace(-4, 4, 17)
  np.testing.assert_allclose(layers.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))),
                             rtol=1e-6, atol=1e-6)


def test_gelu_is_exact_erf_not_tanh():
  x = np.linspace(-3, 3, 13, dtype=np.float32)
  exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
  np.testing.assert_allclose(layers.activation("gelu")(x), exact, atol=1e-6)
  assert np.max(np.abs(layers.activation("gelu_tanh")(x) - exact)) > 1e-5


def test_gelu_and_its_gradient_match_jax_over_the_tails():
  x = jnp.linspace(-10, 10, 2001)
  ref = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731
  np.testing.assert_allclose(layers.gelu(x), ref(x), atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x), jax.vmap(jax.grad(ref))(x),
                             atol=2e-6)


def test_swiglu_and_its_gradients_match_autodiff():
  gate = jnp.linspace(-12, 12, 241).reshape(1, 241)
  up = jnp.cos(jnp.arange(241.0)).reshape(1, 241) * 3
  ref = lambda g, u: jax.nn.silu(g) * u  # noqa: E731
  np.testing.assert_allclose(layers.swiglu(gate, up), ref(gate, up), rtol=1e-6, atol=1e-6)
  w = jnp.sin(jnp.arange(241.0))  # a cotangent that is not all ones
  ours = jax.grad(lambda g, u: jnp.sum(w * layers.swiglu(g, u)), argnums=(0, 1))(gate, up)
  theirs = jax.grad(lambda g, u: jnp.sum(w * ref(g, u)), argnums=(0, 1))(gate, up)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="swish2"):
    layers.activation("swish2")
  with pytest.raises(ValueError, match="batchnorm"):
    layers.make_norm("batchnorm", 1e-5, jnp.float32)
  with pytest.raises(ValueError, match="sometimes"):
    layers.remat_policy("sometimes")


def test_layernorm_matches_numpy_with_eps(rng):
  x = jax.random.normal(rng, (3, 5, 8)) * 3 + 1
  ln = layers.LayerNorm(eps=1e-5)
  params = ln.init(rng, x)
  params = jax.tree.map(lambda p: p + 0.5, params)  # non-trivial scale and bias
  xn = np.asarray(x)
  ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5) * 1.5 + 0.5
  np.testing.assert_allclose(ln.apply(params, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layernorm_gradients_match_autodiff_of_the_formula(rng, use_bias, dtype):
  k = jax.random.split(rng, 4)
  x = (jax.random.normal(k[0], (3, 5, 16)) * 3 + 1).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(k[1], (16,))
  bias = jax.random.normal(k[2], (16,)) if use_bias else None
  w = jax.random.normal(k[3], x.shape)  # a cotangent that is not all ones

  def formula(x, scale, bias):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + 1e-5) * scale
    return y if bias is None else y + bias

  def module(x, scale, bias):
    params = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}
    return layers.LayerNorm(eps=1e-5, use_bias=use_bias).apply({"params": params}, x)

  argnums = (0, 1, 2) if use_bias else (0, 1)
  ours = jax.grad(lambda *a: jnp.sum(w * module(*a)), argnums=argnums)(x, scale, bias)
  theirs = jax.grad(lambda *a: jnp.sum(w * formula(*a)), argnums=argnums)(x, scale, bias)
  assert ours[0].dtype == dtype
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-4, atol=1e-4 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("in_dims", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_matches_tensordot_and_its_autodiff(rng, in_dims, dtype):
  k = jax.random.split(rng, 3)
  x = jax.random.normal(k[0], (2, 3, 4, 5)).astype(dtype)
  kernel = jax.random.normal(k[1], (4, 5, 6)[2 - in_dims:]).astype(dtype)
  out_shape = x.shape[:4 - in_dims] + kernel.shape[in_dims:]
  w = jax.random.normal(k[2], out_shape)  # a cotangent that is not all ones

  def loss(f):
    return lambda x, kernel: jnp.sum(w * f(x, kernel).astype(jnp.float32))

  ours = layers.contract(x, kernel, in_dims)
  theirs = jnp.tensordot(x, kernel, axes=in_dims)
  assert ours.shape == out_shape and ours.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                             rtol=tol, atol=tol)
  g_ours = jax.grad(loss(lambda a, b: layers.contract(a, b, in_dims)), argnums=(0, 1))(x, kernel)
  g_theirs = jax.grad(loss(lambda a, b: jnp.tensordot(a, b, axes=in_dims)), argnums=(0, 1))(
      x, kernel)
  for a, b in zip(g_ours, g_theirs):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * 10)


def test_dense_through_contract_equals_flax_dense(rng):
  x = jax.random.normal(rng, (2, 7, 8))
  plain = nn.Dense(16)
  ours = nn.Dense(16, dot_general=layers.dense_dot_general)
  params = plain.init(rng, x)
  grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(grad(ours), grad(plain), rtol=1e-5, atol=1e-6)
  assert "custom_vjp_call" in str(jax.make_jaxpr(ours.apply)(params, x))
  # An explicit precision goes to lax.dot_general, as nn.Dense would pass it.
  exact = nn.Dense(16, dot_general=layers.dense_dot_general, precision="highest")
  assert "custom_vjp_call" not in str(jax.make_jaxpr(exact.apply)(params, x))
  np.testing.assert_allclose(exact.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_numpy_and_computes_in_float32(rng):
  x = jax.random.normal(rng, (2, 4, 16))
  norm = layers.RMSNorm(eps=1e-6)
  params = norm.init(rng, x)
  xn = np.asarray(x)
  ref = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(norm.apply(params, x), ref, rtol=1e-5, atol=1e-5)
  out16 = layers.RMSNorm(eps=1e-6, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=3e-2)


def test_rope_scores_depend_only_on_relative_position(rng):
  kq, kk = jax.random.split(rng)
  q = jax.random.normal(kq, (1, 1, 1, 8))
  k = jax.random.normal(kk, (1, 1, 1, 8))

  def score(pq, pk):
    cq, sq = layers.rope_frequencies(jnp.array([[pq]]), 8, 10000.0)
    ck, sk = layers.rope_frequencies(jnp.array([[pk]]), 8, 10000.0)
    return jnp.sum(layers.apply_rope(q, cq, sq) * layers.apply_rope(k, ck, sk))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
  assert abs(float(score(5, 2)) - float(score(5, 4))) > 1e-4
  cos, sin = layers.rope_frequencies(jnp.array([[7]]), 8, 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, cos, sin)), jnp.linalg.norm(q),
                             rtol=1e-5)


def test_masks_causal_padding_prefix():
  causal = layers.make_attention_mask(4, 4, causal=True)
  np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((4, 4), bool)))
  padding = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  both = layers.make_attention_mask(4, 4, padding=padding, causal=True)
  assert both.shape == (2, 1, 4, 4)
  assert not both[0, 0, 3, 2] and both[1, 0, 3, 2]
  prefix = layers.make_attention_mask(4, 4, causal=True, prefix_len=jnp.array([2, 0]))
  assert prefix[0, 0, 0, 1]  # inside the prefix: bidirectional
  assert not prefix[0, 0, 1, 3]  # after the prefix: causal
  assert not prefix[1, 0, 0, 1]
  # A single decoding query is aligned with the end of the keys.
  np.testing.assert_array_equal(layers.make_attention_mask(1, 5, causal=True)[0, 0, 0], np.ones(5))


@pytest.mark.parametrize("kv_heads,mask_heads", [(4, 1), (4, 4), (2, 1), (2, 4), (1, 4)])
def test_dot_product_attention_matches_jax_with_masks_gqa_and_gradients(rng, kv_heads, mask_heads):
  """Ours (heads-major, normalised after the values) against jax.nn's XLA path:
  outputs and the gradients of q, k and v, with a causal + padding mask given
  per head or shared, a fully masked row, and grouped keys/values."""
  kq, kk, kv, kg = jax.random.split(rng, 4)
  q = jax.random.normal(kq, (2, 5, 4, 8))
  k, v = (jax.random.normal(key, (2, 7, kv_heads, 8)) for key in (kk, kv))
  mask = layers.make_attention_mask(5, 7, causal=True,
                                    padding=jnp.array([[1] * 7, [1, 1, 1, 0, 0, 1, 1]], bool))
  mask = jnp.broadcast_to(mask, (2, mask_heads, 5, 7)).at[1, :, 0].set(False)  # a row sees nothing
  cotangent = jax.random.normal(kg, q.shape)

  def run(f):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cotangent)

  ours = run(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, "cpu"))
  want = run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0))
  chex.assert_trees_all_close(ours, want, rtol=1e-5, atol=1e-5)
  xla = attention.dot_product_attention(q, k, v, mask, implementation="xla")
  np.testing.assert_allclose(xla, want[0], rtol=1e-6, atol=1e-6)


def test_attention_projects_q_k_v_as_separate_params_and_matches_densend(rng):
  """One fused matmul inside, but `query`/`key`/`value` params as DenseND's,
  with the same initial values, and the same output as three DenseND calls."""
  x = jax.random.normal(rng, (2, 6, 16))
  attn = layers.Attention(num_heads=4, head_dim=4)
  params = nn.unbox(attn.init(rng, x))["params"]
  dense = layers.DenseND((4, 4), ("embed", "heads", "kv"))

  class ThreeDense(nn.Module):  # the projections as they were: three DenseND modules
    @nn.compact
    def __call__(self, x):
      return [layers.DenseND((4, 4), ("embed", "heads", "kv"), name=n)(x)
              for n in ("query", "key", "value")]

  before = nn.unbox(ThreeDense().init(rng, x))["params"]
  chex.assert_trees_all_equal({n: params[n] for n in before}, before)
  out, _ = attn.apply({"params": params}, x)
  proj = {n: dense.apply({"params": params[n]}, x) for n in ("query", "key", "value")}
  scores = jnp.einsum("btnh,bsnh->bnts", proj["query"] / 2.0, proj["key"])
  mixed = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), proj["value"])
  want = layers.DenseND((16,), ("heads", "kv", "embed"), in_dims=2).apply(
      {"params": params["out"]}, mixed)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(rng):
  x = jax.random.normal(rng, (2, 6, 16))
  gqa = layers.Attention(num_heads=4, head_dim=4, num_kv_heads=2)
  p = nn.unbox(gqa.init(rng, x))["params"]
  mha = layers.Attention(num_heads=4, head_dim=4)
  rep = lambda t: jnp.repeat(t, 2, axis=-2)  # kernel [D, K, H] / bias [K, H]
  p_mha = dict(p)
  for name in ("key", "value"):
    p_mha[name] = {"kernel": rep(p[name]["kernel"]), "bias": rep(p[name]["bias"])}
  mask = layers.make_attention_mask(6, 6, causal=True)
  out_gqa, _ = gqa.apply({"params": p}, x, mask)
  out_mha, _ = mha.apply({"params": p_mha}, x, mask)
  np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-5)


def test_attention_kv_cache_matches_full_forward(rng):
  attn = layers.Attention(num_heads=2, head_dim=8, num_kv_heads=1, rope_theta=10000.0)
  x = jax.random.normal(rng, (2, 5, 16))
  params = attn.init(rng, x)
  full, _ = attn.apply(params, x, layers.make_attention_mask(5, 5, causal=True))
  cache = {"k": jnp.zeros((2, 8, 1, 8)), "v": jnp.zeros((2, 8, 1, 8)), "index": jnp.array(0)}
  steps = []
  step = jax.jit(attn.apply)
  for t in range(5):
    valid = (jnp.arange(8) <= t)[None, None, None, :]
    out, cache = step(params, x[:, t:t + 1], valid, jnp.full((2, 1), t), cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
  assert int(cache["index"]) == 5


def test_swiglu_mlp_params():
  mlp = layers.MLP(hidden_dim=24, act="swiglu", use_bias=False)
  params = nn.unbox(mlp.init(jax.random.key(1), jnp.ones((1, 2, 8))))["params"]
  assert set(params) == {"gate", "up", "down"}
  assert params["gate"]["kernel"].shape == (8, 24) and params["down"]["kernel"].shape == (24, 8)


@pytest.mark.parametrize("use_bias", [True, False])
def test_swiglu_mlp_runs_gate_and_up_as_one_matmul_with_the_same_values(rng, use_bias):
  mlp = layers.MLP(hidden_dim=24, act="swiglu", use_bias=use_bias)
  x = jax.random.normal(rng, (2, 3, 8))
  boxed = mlp.init(jax.random.key(1), x)["params"]
  assert boxed["gate"]["kernel"].names == ("embed", "mlp")  # sharded over F as before
  params = nn.unbox(boxed)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)

  def formula(p, x):
    dense = lambda name, h: h @ p[name]["kernel"] + (p[name]["bias"] if use_bias else 0)  # noqa: E731
    return dense("down", jax.nn.silu(dense("gate", x)) * dense("up", x))

  np.testing.assert_allclose(mlp.apply({"params": params}, x), formula(params, x),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(mlp.apply({"params": p}, x))), argnums=(0, 1))(
      params, x)
  theirs = jax.grad(lambda p, x: jnp.sum(jnp.sin(formula(p, x))), argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)


BLOCK = dict(num_heads=2, head_dim=8, mlp_dim=32, act="quick_gelu")


def _stack_io(scan, remat="none", collect=False, depth=3):
  model = layers.Stack(depth=depth, block_kwargs=BLOCK, scan=scan, remat=remat,
                       collect_hidden=collect)
  x = jax.random.normal(jax.random.key(2), (2, 5, 16))
  return model, x


def test_scanned_and_unrolled_stacks_agree():
  scanned, x = _stack_io(scan=True)
  unrolled, _ = _stack_io(scan=False)
  params = init_params(scanned, x)
  assert params["layers"]["block"]["mlp"]["fc1"]["kernel"].shape == (3, 16, 32)
  flat = layers.unstack_layers(params, 3)
  assert set(flat) == {"layers_0", "layers_1", "layers_2"}
  y_scan = jax.jit(scanned.apply)({"params": params}, x)[0]
  y_unroll = jax.jit(unrolled.apply)({"params": flat}, x)[0]
  np.testing.assert_allclose(y_scan, y_unroll, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(layers.stack_layers(flat, 3), params)


def test_collect_hidden_returns_every_block_output():
  model, x = _stack_io(scan=True, collect=True)
  params = {"params": init_params(model, x)}
  y, hidden, _ = jax.jit(model.apply)(params, x)
  assert hidden.shape == (3, 2, 5, 16)
  np.testing.assert_allclose(hidden[-1], y)
  assert not np.allclose(hidden[0], hidden[1])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_gives_the_same_gradients(policy, scan):
  plain, x = _stack_io(scan=scan)
  remat, _ = _stack_io(scan=scan, remat=policy)
  params = {"params": init_params(plain, x)}

  def loss(model):
    return lambda p: jnp.sum(model.apply(p, x)[0] ** 2)

  g_plain = jax.jit(jax.grad(loss(plain)))(params)
  g_remat = jax.jit(jax.grad(loss(remat)))(params)
  chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-4, atol=1e-4)  # float32 round-off


def _saved(policy, act="gelu", cpu_tuning=False):
  """What a one-block stack under `policy` keeps for the backward, besides its
  arguments: [(shape, name or the op that made it)]."""
  from jax._src import ad_checkpoint
  block = dict(num_heads=2, head_dim=4, mlp_dim=24, act=act)
  model = layers.Stack(depth=1, block_kwargs=block, scan=False, remat=policy)
  x = jnp.ones((2, 5, 8))
  with backend.cpu_tuning_as(cpu_tuning):
    params = model.init(jax.random.key(0), x)
    saved = ad_checkpoint.saved_residuals(lambda p, x: model.apply(p, x)[0].sum(), params, x)
  out = []
  for aval, what in saved:
    if what.startswith("from the argument"):
      continue
    name = what.split("'")[1] if what.startswith("named '") else what.split(" from ")[0]
    out.append((aval.shape, name))
  return sorted(out)


# [B, T] = [2, 5], D = 8, N = 2 heads of H = 4, F = 24.
# q, k, v and the attention output are named with their heads merged: [B, T, N * H].
QKV, ATTN, RESID = [((2, 5, 8), "qkv")] * 3, [((2, 5, 8), "attn_out")], ((2, 5, 8), "residual")


@pytest.mark.parametrize("policy, act, saved", [
    ("full", "gelu", []),
    ("nothing_saveable", "gelu", []),
    ("save_attention", "gelu", sorted(QKV + ATTN)),
    ("save_all_but_mlp_hidden", "gelu", sorted(QKV + ATTN + [RESID, ((2, 5, 8), "mlp_in")])),
    ("save:mlp_hidden", "gelu", [((2, 5, 24), "mlp_hidden")]),
    ("save:mlp_hidden", "swiglu", [((2, 5, 24), "mlp_hidden")] * 2),
    ("save:residual,qkv", "gelu", sorted(QKV + [RESID])),
    # The weight matmuls' outputs that the backward reads: q/k/v (one matmul),
    # the attention's projection and fc1 (fc2's output is only added).
    ("dots_no_batch", "gelu", sorted([((2, 5, 3, 2, 4), "output of dot_general"),
                                     ((2, 5, 8), "output of dot_general"),
                                     ((2, 5, 24), "output of dot_general")])),
    # ... and the attention's batched ones: the scores and the weighted sum.
    ("dots", "gelu", sorted([((2, 5, 3, 2, 4), "output of dot_general"),
                            ((2, 5, 8), "output of dot_general"),
                            ((2, 5, 24), "output of dot_general"),
                            ((2, 2, 5, 5), "output of dot_general"),
                            ((2, 2, 5, 4), "output of dot_general")])),
])
def test_remat_policies_save_what_they_name(policy, act, saved):
  assert _saved(policy, act) == saved


def test_named_remat_needs_known_names():
  for bad in ("save:qkv,scores", "save:"):
    with pytest.raises(ValueError, match="a block names"):
      layers.remat_policy(bad)


@pytest.mark.parametrize("policy", ["save_attention", "save:mlp_hidden,residual"])
def test_named_remat_gives_the_same_gradients(policy):
  plain, x = _stack_io(scan=True)
  remat, _ = _stack_io(scan=True, remat=policy)
  params = {"params": init_params(plain, x)}
  grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply(p, x)[0] ** 2)))(params)
           for m in (plain, remat)]
  chex.assert_trees_all_close(*grads, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("kind", ["vit", "causal_gqa_rope"])
def test_query_index_gives_the_full_stacks_rows_and_gradients(scan, kind):
  """The last block run at a few positions alone (`query_index`) equals the
  full stack's output at them, with its gradients; remat too."""
  block = BLOCK if kind == "vit" else dict(
      num_heads=4, head_dim=8, mlp_dim=32, num_kv_heads=2, act="swiglu", norm="rmsnorm",
      use_bias=False, rope_theta=100.0)
  model = layers.Stack(depth=3, block_kwargs=block, scan=scan)
  x = jax.random.normal(jax.random.key(2), (3, 7, 16))
  mask, positions = None, None
  if kind != "vit":
    padding = jnp.arange(7)[None] < jnp.array([[7], [5], [2]])
    mask = layers.make_attention_mask(7, 7, padding=padding, causal=True)
    positions = jnp.broadcast_to(jnp.arange(7), (3, 7)) + 3
  index = jnp.array([[0, 6], [4, 1], [1, 1]])
  params = {"params": init_params(model, x)}

  def rows(p, asked):
    if not asked:
      return layers.take_rows(model.apply(p, x, mask, positions)[0], index)
    return model.apply(p, x, mask, positions, query_index=index)[0]

  full = jax.jit(rows, static_argnums=1)(params, False)
  got = jax.jit(rows, static_argnums=1)(params, True)
  assert got.shape == (3, 2, 16)
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(lambda p, a: jnp.sum(jnp.sin(rows(p, a)))), static_argnums=1)
  chex.assert_trees_all_close(grad(params, True), grad(params, False), rtol=1e-4, atol=1e-5)
  remat = layers.Stack(depth=3, block_kwargs=block, scan=scan, remat="full")
  np.testing.assert_allclose(
      remat.apply(params, x, mask, positions, query_index=index)[0], full, rtol=1e-5, atol=1e-5)


def test_query_index_flops_count_the_last_block_at_its_rows():
  full = layers.stack_forward_flops(3, 10, 16, 64, num_heads=2)
  assert layers.stack_forward_flops(3, 10, 16, 64, num_heads=2, last_queries=10) == full
  one = layers.stack_forward_flops(3, 10, 16, 64, num_heads=2, last_queries=1)
  block = full / 3
  kv = 2 * 10 * 16 * 8 * 2 * 2  # keys and values still at all 10 positions
  assert one == 2 * block + kv + (block - kv) / 10
