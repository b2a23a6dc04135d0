"""The chunked (ring, shard_map) contrastive losses equal the plain ones, value and
gradients, on meshes of 8 fake devices, and never build the B x B logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import collective_losses, losses, parallel

B, D = 32, 16
MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 1, "fsdp": 4, "tensor": 2},
          {"preset": "multislice", "dcn": 2}]


def _inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  return (unit(jax.random.normal(k1, (B, D))), unit(jax.random.normal(k2, (B, D))),
          jnp.float32(1 / 0.07), jnp.float32(-10.0))


def _plain(kind):
  if kind == "softmax":
    return lambda i, t, s, b: losses.clip_softmax_loss(i, t, s)[0]
  return lambda i, t, s, b: losses.siglip_loss(i, t, s, b)[0]


def _chunked(kind):
  if kind == "softmax":
    return lambda i, t, s, b: collective_losses.chunked_clip_softmax_loss(i, t, s)[0]
  return lambda i, t, s, b: collective_losses.chunked_siglip_loss(i, t, s, b)[0]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_chunked_loss_and_gradients_equal_the_plain_loss(kind, shape):
  img, txt, scale, bias = _inputs()
  if kind == "sigmoid":
    scale = jnp.float32(10.0)
  want, want_grads = jax.jit(jax.value_and_grad(_plain(kind), argnums=(0, 1, 2, 3)))(
      img, txt, scale, bias)

  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **shape})
  sharded = parallel.host_to_global({"img": img, "txt": txt}, mesh)
  with parallel.activate(mesh):
    fn = jax.jit(jax.value_and_grad(_chunked(kind), argnums=(0, 1, 2, 3)))
    got, grads = fn(sharded["img"], sharded["txt"], scale, bias)
    hlo = fn.lower(sharded["img"], sharded["txt"], scale, bias).compile().as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  names = ("image", "text", "scale", "bias")
  for name, g, w in zip(names, grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)
  assert f"[{B},{B}]" not in hlo  # only [b, b] blocks, b = B / devices on the batch axes
  assert "collective-permute" in hlo


def test_without_a_mesh_it_is_the_plain_loss():
  img, txt, scale, _ = _inputs(1)
  np.testing.assert_allclose(collective_losses.chunked_clip_softmax_loss(img, txt, scale)[0],
                             losses.clip_softmax_loss(img, txt, scale)[0], rtol=1e-6)
