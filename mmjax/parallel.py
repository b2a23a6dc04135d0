"""The device mesh, the logical-axis rules, and placing host batches on the mesh.

Models name their axes logically (`embed`, `mlp`, `heads`, ...); a rule table
maps each logical name to mesh axes (`data`, `fsdp`, `tensor`). Swapping the
mesh or the rules is a config change, never a model change.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Params: `embed` is sharded over fsdp (ZeRO-3
# style), the wide dims (`mlp`, `heads`, `vocab`) over tensor. Activations: the
# batch over data and fsdp together, the feature dims over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("proj", "tensor"),
    ("layers", None),
    ("patch", None),
    ("pos", None),
    ("norm", None),
)


def make_mesh(shape: dict[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh. One size may be -1: it takes the rest.

  `shape` is a mapping or ConfigDict with keys data / fsdp / tensor.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [int(shape[a]) if a in shape else 1 for a in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if n % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do not divide the "
          f"{n} devices; set --config.mesh.* so that they do")
    sizes[MESH_AXES.index(unknown[0])] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {n} are "
        f"available; set --config.mesh.data/fsdp/tensor to multiply to {n} (or use -1 for one)")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # non-TPU topologies without a known physical layout
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def rules_from_config(rules: Iterable | None) -> tuple[tuple[str, Any], ...]:
  """A config's rule list (pairs, mesh axes as str / list / None) -> the rule tuple."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Makes `mesh` and `rules` current, so activation constraints resolve."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _spec_fits(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (those dims are replicated)."""
  fixed = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fixed.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      logging.warning("dim of size %d is not divisible by mesh axes %s (%d): replicated",
                      dim, names, size)
      fixed.append(None)
    else:
      fixed.append(axes)
  return P(*fixed)


def logical_specs(boxed_tree: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """PartitionSpecs (in mesh axes) for a tree of `nn.Partitioned` leaves."""
  logical = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh(logical, rules)


def shardings_for(boxed_abstract: Any, mesh: Mesh,
                  rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for an abstract (eval_shape) tree whose leaves may be boxed.

  Unboxed leaves (optimizer counters, RNG keys) are replicated. A dim that the
  rule's mesh axes do not divide is replicated rather than failing.
  """
  specs = logical_specs(boxed_abstract, rules)
  unboxed = nn.meta.unbox(boxed_abstract)

  def one(leaf, spec):
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, _spec_fits(leaf.shape, spec, mesh))

  return jax.tree.map(one, unboxed, specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def sharded_init(init_fn, mesh: Mesh, rules: Sequence[tuple[str, Any]], *args) -> Any:
  """Runs `init_fn(*args)` under jit with every output placed by the rules.

  The weights are created already sharded: no host ever holds them whole.
  Returns the unboxed tree. The rules are deliberately not active while
  tracing: out_shardings place the result, and flax would otherwise constrain
  per-layer slices inside nn.scan with the stacked (`layers`) names.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = shardings_for(abstract, mesh, rules)
  return jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise ValueError(
        f"batch_size={global_batch} is not divisible by the data-parallel size "
        f"data*fsdp={dp} of mesh {dict(mesh.shape)}; change --config.batch_size or --config.mesh.*")
  if global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} is not divisible by {jax.process_count()} processes")


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Places each process's slice of the batch as one global array over the mesh.

  Every process passes its own [B / process_count, ...] arrays; the result is a
  global [B, ...] jax.Array sharded on the leading dim over data x fsdp.
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)
