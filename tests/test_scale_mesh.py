"""Mesh presets, the dcn (multi-slice) axis, and the chunked loss selected by config."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from experiments import clip_shapes
from mmjax import checkpoint, parallel
from mmjax.train import loop, optim, step as step_lib, tasks


@pytest.mark.parametrize("preset, extra, want", [
    ("dp", {}, {"data": 8, "fsdp": 1, "tensor": 1}),
    ("fsdp", {}, {"data": 1, "fsdp": 8, "tensor": 1}),
    ("fsdp_tensor", {}, {"data": 1, "fsdp": 2, "tensor": 4}),
    ("fsdp_tensor", {"tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}),
    ("multislice", {"dcn": 2}, {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}),
    ("", {"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4, "tensor": 1}),
])
def test_presets_build_the_meshes_they_name(preset, extra, want):
  cfg = {"preset": preset, "dcn": 1, "data": -1, "fsdp": 1, "tensor": 1, **extra}
  mesh = parallel.make_mesh(cfg)
  assert dict(mesh.shape) == want
  assert mesh.axis_names == tuple(want)


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(ValueError, match="fsdp_tensor"):
    parallel.make_mesh({"preset": "zero3"})


def test_dcn_axis_joins_the_batch_axes_and_leaves_params_alone():
  mesh = parallel.make_mesh({"preset": "multislice", "dcn": 2})
  assert parallel.batch_axes(mesh) == ("dcn", "data", "fsdp")
  assert parallel.batch_sharding(mesh, 2).spec == P(("dcn", "data", "fsdp"), None)
  assert parallel.data_parallel_size(mesh) == 8
  one_slice = parallel.make_mesh({"preset": "fsdp"})
  rules = dict(parallel.rules_for_mesh(parallel.DEFAULT_RULES, one_slice))
  assert rules["act_batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
  # Params are sharded within a slice only: replicated across dcn.
  boxed = {"w": nn.LogicallyPartitioned(
      jax.ShapeDtypeStruct((16, 32), jnp.float32), ("embed", "mlp"))}
  assert parallel.shardings_for(boxed, mesh)["w"].spec == P("fsdp", "tensor")


def _task(**model):
  c = clip_shapes.get_config("runlocal=true")
  c.model.vision.variant, c.model.text.size, c.model.embed_dim = "tiny/8", "tiny", 16
  c.model.text.vocab_size = 64
  c.data.context_length = 16
  c.mesh = ml_collections.ConfigDict({"preset": "fsdp", "dcn": 1, "data": -1, "fsdp": 1,
                                      "tensor": 1})
  for k, v in model.items():
    c.model[k] = v
  return tasks.build_task(c, with_data=False)


def test_a_task_builds_without_data():
  task = _task()
  assert task.tokenizer is None and task.model_config.text.vocab_size == 64
  with pytest.raises(ValueError, match="vocab_size"):
    c = clip_shapes.get_config("runlocal=true")
    tasks.build_task(c, with_data=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_chunked_loss_switch_gives_the_same_loss_and_gradients(loss):
  mesh = parallel.make_mesh({"preset": "fsdp"})
  plain, chunked = _task(loss=loss), _task(loss=loss, chunked_loss=True)
  params = jax.jit(lambda: nn.meta.unbox(plain.init(jax.random.PRNGKey(0))))()
  batch = {"image": jax.random.normal(jax.random.key(1), (16, 32, 32, 3)),
           "text": jax.random.randint(jax.random.key(2), (16, 16), 3, 64).at[:, 9].set(2)}
  batch = parallel.host_to_global(jax.device_get(batch), mesh)
  results = []
  with parallel.activate(mesh, parallel.DEFAULT_RULES):
    for task in (plain, chunked):
      fn = jax.jit(jax.value_and_grad(lambda p, b, t=task: t.loss(p, b, None)[0]))
      results.append(jax.device_get(fn(params, batch)))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5)


def test_state_shardings_follow_the_preset():
  task = _task()
  tx = optax.adam(1e-3)
  for preset, axis in (("fsdp", "fsdp"), ("fsdp_tensor", "tensor")):
    mesh = parallel.make_mesh({"preset": preset})
    _, sh = step_lib.state_shardings(task, tx, 0, mesh, parallel.DEFAULT_RULES)
    fc1 = sh.params["vision"]["encoder"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
    assert axis in tuple(fc1.spec)
    mu = sh.opt_state[0].mu["vision"]["encoder"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
    assert mu.spec == fc1.spec


class _Frozen:
  """Two params, one frozen: its optimizer state is an empty MaskedNode."""
  frozen = ("b",)

  def init(self, rng):
    return {"w": jax.random.normal(rng, (8, 4)), "b": jnp.zeros((4,))}


def test_a_state_with_frozen_params_saves_and_restores(tmp_path):
  task, mesh = _Frozen(), parallel.make_mesh({"preset": "fsdp"})
  mask = optim.trainable_mask(task.init(jax.random.PRNGKey(0)), task.frozen)
  cfg = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, weight_decay=0.1, b1=0.9,
                                       b2=0.99, eps=1e-8, clip_norm=1.0))
  tx, _ = optim.make_optimizer(cfg, 10, mask)
  abstract, shardings = step_lib.state_shardings(task, tx, 0, mesh, parallel.DEFAULT_RULES)
  state = step_lib.create_state(task, tx, 0, mesh, parallel.DEFAULT_RULES, shardings)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state)
  restored, _ = ckpt.restore(loop.restore_target(abstract, shardings), 1)
  ckpt.close()
  chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(state.params))
  assert restored.params["w"].sharding == shardings.params["w"]
