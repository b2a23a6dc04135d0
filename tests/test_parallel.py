"""Mesh construction, logical-axis rules, and sharded == single-device (8 fake devices)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_clip_config
from mmjax import parallel
from mmjax.train import step as step_lib
from mmjax.models import layers
from mmjax.models.clip import CLIP

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _mesh(shape):
  return parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))


def _batch(b=8):
  images = jax.random.normal(jax.random.key(0), (b, 32, 32, 3))
  ids = jax.random.randint(jax.random.key(1), (b, 16), 3, 64).at[:, 11].set(2)
  return images, ids


def test_there_are_8_fake_devices():
  assert jax.device_count() == 8


def test_mesh_fills_in_minus_one():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_mesh_with_a_wrong_product_names_the_sizes():
  with pytest.raises(ValueError, match="multiply to 8"):
    parallel.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match="do not divide"):
    parallel.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
  with pytest.raises(ValueError, match="only one axis"):
    parallel.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})


def test_batch_size_must_divide_the_data_axes():
  mesh = _mesh((2, 2, 2))
  parallel.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match="batch_size=6 .* data\\*fsdp=4"):
    parallel.check_batch_size(6, mesh)


# What the default rules say, written out by hand for representative params.
EXPECTED = {
    "vision/encoder/layers/block/mlp/fc1/kernel": P(None, "fsdp", "tensor"),
    "vision/encoder/layers/block/mlp/fc2/kernel": P(None, "tensor", "fsdp"),
    "vision/encoder/layers/block/attn/query/kernel": P(None, "fsdp", "tensor", None),
    "vision/encoder/layers/block/attn/out/kernel": P(None, "tensor", None, "fsdp"),
    "vision/encoder/layers/block/norm1/scale": P(None, None),
    "vision/patch_embed/kernel": P(None, "fsdp"),
    "vision/pos_embed": P(None, "fsdp"),
    "text/token_embed/embedding": P("tensor", "fsdp"),
    "image_proj/kernel": P("fsdp", "tensor"),
    "log_scale": P(),
}


class _ModelTask:
  """The part of the Task protocol that initialising a state reads."""

  def __init__(self, model):
    self.model = model

  def init(self, rng):
    return self.model.init(rng, *_batch())["params"]


def _sharded_init(mesh, rules=parallel.DEFAULT_RULES):
  """The model's params as a run creates them: step.create_state over the mesh."""
  model, tx = CLIP(tiny_clip_config()), optax.sgd(0.1)
  task = _ModelTask(model)
  _, shardings = step_lib.state_shardings(task, tx, 0, mesh, rules)
  state = step_lib.create_state(task, tx, 0, mesh, rules, shardings)
  return model, {"params": state.params}



@pytest.mark.parametrize("shape", MESHES)
def test_params_get_the_specs_the_rules_say(shape):
  mesh = _mesh(shape)
  _, variables = _sharded_init(mesh)
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for name, spec in EXPECTED.items():
    arr = flat[name]
    got = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
    want = tuple(spec) + (None,) * (arr.ndim - len(spec))
    assert got == want, (name, got, want)
    # The shard really is that fraction of the array.
    expect = [d // (mesh.shape[a] if a else 1) for d, a in zip(arr.shape, want)]
    assert list(arr.addressable_shards[0].data.shape) == expect, name
  kernel = flat["vision/encoder/layers/block/mlp/fc1/kernel"]
  assert len({s.device for s in kernel.addressable_shards}) == 8


def test_a_config_can_replace_the_rules():
  mesh = _mesh((2, 4, 1))
  rules = parallel.rules_from_config([(k, None if k == "embed" else v)
                                      for k, v in parallel.DEFAULT_RULES])
  _, variables = _sharded_init(mesh, rules)
  kernel = variables["params"]["image_proj"]["kernel"]
  assert kernel.sharding.is_fully_replicated is False or mesh.shape["tensor"] == 1
  assert "fsdp" not in tuple(kernel.sharding.spec)


def test_indivisible_dims_are_replicated_not_fatal():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  abstract = jax.ShapeDtypeStruct((12, 16), jnp.float32)
  boxed = flax.linen.LogicallyPartitioned(abstract, ("embed", "mlp"))
  sharding = parallel.shardings_for({"w": boxed}, mesh)["w"]
  assert tuple(sharding.spec)[0] is None  # 12 rows do not split 8 ways


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_equals_single_device(shape):
  images, ids = _batch()
  mesh = _mesh(shape)
  model, variables = _sharded_init(mesh)
  params = jax.device_get(variables["params"])  # the same params, on one device
  single = jax.jit(model.apply)({"params": params}, images, ids)

  global_batch = parallel.host_to_global({"images": images, "ids": ids}, mesh)
  assert global_batch["images"].sharding.spec[0] == ("data", "fsdp")
  with parallel.activate(mesh):
    sharded = jax.jit(model.apply)(variables, global_batch["images"], global_batch["ids"])
  for key in ("image_embeds", "text_embeds", "logit_scale"):
    np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(single[key]),
                               rtol=2e-5, atol=2e-5, err_msg=key)


def test_logical_axis_size_reads_the_active_mesh_and_rules():
  assert parallel.logical_axis_size("mlp") == 1  # no mesh
  with parallel.activate(_mesh((2, 2, 2))):
    assert parallel.logical_axis_size("mlp") == 2
    assert parallel.logical_axis_size("act_batch") == 4
    assert parallel.logical_axis_size("kv") == 1


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_swiglu_mlp_sharded_equals_single_device_without_moving_activations(shape):
  """Gate and up run as one matmul: side by side unsharded, interleaved where
  the tensor axis splits F, so that no activation changes shards."""
  mlp = layers.MLP(hidden_dim=32, act="swiglu")
  x = jax.random.normal(jax.random.key(0), (8, 5, 16))
  boxed = mlp.init(jax.random.key(1), x)["params"]
  params = flax.linen.unbox(boxed)

  def loss(p, x):
    return jnp.sum(jnp.sin(mlp.apply({"params": p}, x)))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want = grad(params, x)
  mesh = _mesh(shape)
  placed = jax.device_put(params, parallel.shardings_for(boxed, mesh))
  x_placed = parallel.host_to_global({"x": np.asarray(x)}, mesh)["x"]
  with parallel.activate(mesh):
    got = grad(placed, x_placed)
    hlo = grad.lower(placed, x_placed).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
  assert "all-to-all" not in hlo and "collective-permute" not in hlo
