"""mmjax.backend: the layers' CPU forms only where the run computes on CPUs."""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params
from mmjax import backend
from mmjax.models import layers
from mmjax.models.vit import ViT, ViTConfig


@pytest.mark.parametrize("environ, devices, want", [
    ({"JAX_PLATFORMS": "cpu"}, ("/dev/nvidiactl",), True),  # the user's choice wins
    ({"JAX_PLATFORMS": "cuda,cpu"}, (), False),
    ({}, (), True),
    ({}, ("/dev/nvidiactl",), False),  # a GPU host
    ({}, ("/dev/accel0",), False),  # a TPU VM (v4, v5e)
    ({}, ("/dev/vfio/0",), False),  # a TPU VM (v5p, v6e)
    ({"TPU_ACCELERATOR_TYPE": "v5p-8"}, (), False),
])
def test_runs_on_cpu_before_jax_starts(environ, devices, want):
  assert backend.runs_on_cpu(environ, exists=lambda p: p in devices) is want


def test_choice_from_env_then_config_then_platform(monkeypatch):
  tpu, cpu = types.SimpleNamespace(platform="tpu"), types.SimpleNamespace(platform="cpu")
  monkeypatch.delenv(backend.ENV, raising=False)
  assert backend.choose("auto", [tpu]) is False
  assert backend.choose("auto", [cpu]) is True
  assert backend.choose(True, [tpu]) is True
  assert backend.choose("false", [cpu]) is False
  monkeypatch.setenv(backend.ENV, "0")
  assert backend.choose(True, [cpu]) is False
  monkeypatch.delenv(backend.ENV)
  with pytest.raises(ValueError, match="cpu_tuning='maybe'"):
    backend.choose("maybe", [cpu])


def _vit():
  cfg = ViTConfig(variant="tiny/8", image_size=16, pool="gap", num_classes=3)
  model = ViT(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  return model, init_params(model, x), x


def test_plain_forms_have_forward_mode_and_match_the_cpu_forms():
  """Without the CPU forms (as on GPU / TPU) jax.jvp goes through a ViT; both
  give the same values and gradients."""
  model, params, x = _vit()
  loss = lambda p: jnp.sum(model.apply({"params": p}, x)[0] ** 2)  # noqa: E731
  tangent = jax.tree.map(jnp.ones_like, params)
  with backend.cpu_tuning_as(False):
    plain_value, plain_grad = jax.jit(jax.value_and_grad(loss))(params)
    _, jvp = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, tangent)
  with backend.cpu_tuning_as(True):
    tuned_value, tuned_grad = jax.jit(jax.value_and_grad(loss))(params)
    with pytest.raises(TypeError, match="custom_vjp"):
      jax.jvp(loss, (params,), (tangent,))
  np.testing.assert_allclose(plain_value, tuned_value, rtol=1e-5)
  chex.assert_trees_all_close(plain_grad, tuned_grad, rtol=1e-4, atol=1e-6)
  # Forward mode agrees with reverse mode: d loss . tangent = sum of the gradient.
  np.testing.assert_allclose(jvp, sum(jnp.sum(g) for g in jax.tree.leaves(plain_grad)),
                             rtol=1e-4)


def test_swiglu_mlp_forms_agree():
  """SwiGLU's side-by-side projection and hand-written VJP (CPU forms) against
  two plain projections and autodiff."""
  mlp = layers.MLP(hidden_dim=24, act="swiglu", use_bias=False)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  params = init_params(mlp, x)
  f = lambda p, x: jnp.sum(jnp.sin(mlp.apply({"params": p}, x)))  # noqa: E731
  out = {}
  for tuned in (False, True):
    with backend.cpu_tuning_as(tuned):
      out[tuned] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
  chex.assert_trees_all_close(out[False], out[True], rtol=1e-5, atol=1e-6)
