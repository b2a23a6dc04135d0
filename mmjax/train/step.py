"""The train state and the one jitted, sharded train step shared by every task."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2]: a raw key, so checkpoints hold plain arrays


def initial_params(task, seed: int):
  """The (unboxed) random params a run of `seed` starts from, before any restore."""
  init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  return nn.meta.unbox(task.init(init_rng))


def init_state(task, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """The full initial state (params unboxed); traced under jit with out_shardings."""
  params = initial_params(task, seed)
  _, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def create_state(task, tx: optax.GradientTransformation, seed: int, mesh: Mesh, rules,
                 shardings: TrainState) -> TrainState:
  """The initial state of `seed`, created already placed by `shardings` (from
  `state_shardings`): no host ever holds the params whole. The one path by which
  runs, benchmarks and tests initialise a sharded state."""
  with parallel.activate(mesh, rules):
    return jax.jit(lambda: init_state(task, tx, seed), out_shardings=shardings)()


def state_shardings(task, tx, seed: int, mesh: Mesh, rules) -> tuple[Any, TrainState]:
  """(abstract state, shardings): params by the logical rules, optimizer state
  mirroring its params, counters and RNG replicated."""
  boxed = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(seed)))
  param_sh = parallel.shardings_for(boxed, mesh, rules)
  abstract = jax.eval_shape(lambda: init_state(task, tx, seed))
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
  return abstract, shardings


def make_train_step(task, tx: optax.GradientTransformation, mask: Any, schedule: Callable,
                    grad_accum: int = 1) -> Callable:
  """(state, batch) -> (state, metrics). Frozen params are behind stop_gradient,
  so XLA never computes their gradients. With grad_accum = A the batch is split
  into A micro-batches whose gradients are averaged (contrastive losses then see
  B / A negatives per micro-batch)."""

  def loss_fn(params, batch, rng):
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
    return task.loss(params, batch, rng)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, step_rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
        acc = jax.tree.map(jnp.add, carry, (l, a, g))
        return acc, None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), step_rng)))
      (loss, aux, grads), _ = jax.lax.scan(
          body, (zeros[0][0], zeros[0][1], zeros[1]), (jnp.arange(grad_accum), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    trained_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, mask)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(trained_grads),
               "train/lr": schedule(state.step), **{f"train/{k}": v for k, v in aux.items()}}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_sh: TrainState, mesh: Mesh, batch_spec: Any):
  """jit with explicit shardings; the old state is donated."""
  batch_sh = jax.tree.map(lambda x: parallel.batch_sharding(mesh, len(x.shape)), batch_spec)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
