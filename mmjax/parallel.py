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
# Across slices (multi-slice TPU, or GPU nodes over a slow network): only
# data parallelism, whose one gradient all-reduce per step tolerates DCN
# bandwidth. The axis exists only in meshes where it is larger than 1.
DCN_AXIS = "dcn"
# The mesh axes that split the batch, outermost first.
BATCH_AXES = (DCN_AXIS, "data", "fsdp")

# Logical axis -> mesh axes. Params: `embed` is sharded over fsdp (ZeRO-3
# style), the wide dims (`mlp`, `heads`, `vocab`) over tensor. Activations: the
# batch over dcn, data and fsdp together, the feature dims over tensor. Mesh
# axes that a mesh lacks (dcn in a one-slice mesh) are dropped from a rule.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
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

# Named meshes (`--config.mesh.preset=NAME`): the axis sizes they fix; -1 takes
# the devices left. `dcn` stays as configured (1 = one slice) except where a
# preset says otherwise, and "tensor" is filled from the config (see mesh_shape).
PRESETS: dict[str, dict[str, Any]] = {
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},  # params replicated
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},  # params, grads, optimizer sharded (ZeRO-3)
    "fsdp_tensor": {"data": 1, "fsdp": -1, "tensor": "config_or_4"},  # + Megatron-style tensor
    "multislice": {"dcn": "slices", "data": 1, "fsdp": -1, "tensor": "config"},  # fsdp in a slice
}


def mesh_shape(cfg: dict[str, Any] | Any,
               devices: Sequence[jax.Device] | None = None) -> dict[str, int]:
  """Axis sizes {dcn, data, fsdp, tensor} (-1 allowed) from a mesh config.

  Without `preset` the config's sizes are used as they are; with one, the
  preset's sizes replace them (the config still gives `tensor` for
  fsdp_tensor, default 4, and `dcn`; multislice takes `dcn` from the devices'
  slices when the config leaves it at 1).
  """
  def get(key, default):
    return cfg[key] if key in cfg and cfg[key] is not None else default

  sizes = {DCN_AXIS: int(get(DCN_AXIS, 1)), **{a: int(get(a, 1)) for a in MESH_AXES}}
  preset = get("preset", None)
  if not preset:
    return sizes
  if preset not in PRESETS:
    raise ValueError(f"unknown mesh preset {preset!r}; known: {sorted(PRESETS)} (or leave "
                     f"mesh.preset empty and set mesh.data/fsdp/tensor)")
  for axis, value in PRESETS[preset].items():
    if value == "config_or_4":
      value = sizes[axis] if sizes[axis] > 1 else 4
    elif value == "config":
      value = sizes[axis]
    elif value == "slices":
      value = sizes[axis] if sizes[axis] > 1 else num_slices(devices)
    sizes[axis] = int(value)
  return sizes


def num_slices(devices: Sequence[jax.Device] | None = None) -> int:
  devices = jax.devices() if devices is None else devices
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(shape: dict[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh, with a leading `dcn` axis when it is > 1.

  `shape` is a mapping or ConfigDict with keys data / fsdp / tensor and
  optionally dcn and preset (see PRESETS). One size may be -1: it takes the rest.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  named = mesh_shape(shape, devices)
  axes = ((DCN_AXIS,) if named[DCN_AXIS] != 1 else ()) + MESH_AXES
  sizes = [named[a] for a in axes]
  show = lambda: dict(zip(axes, sizes))  # noqa: E731
  unknown = [a for a, s in zip(axes, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {show()}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {show()}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if n % known:
      raise ValueError(
          f"mesh {show()}: the fixed axes ({known}) do not divide the "
          f"{n} devices; set --config.mesh.* so that they do")
    sizes[axes.index(unknown[0])] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
        f"mesh {show()} has {math.prod(sizes)} devices but {n} are "
        f"available; set --config.mesh.data/fsdp/tensor to multiply to {n} (or use -1 for one)")
  return Mesh(_device_grid(axes, sizes, devices), axes)


def _device_grid(axes, sizes, devices) -> np.ndarray:
  """Devices laid out so that the inner axes sit on fast links (ICI / NVLink)."""
  from jax.experimental import mesh_utils
  if axes[0] == DCN_AXIS and num_slices(devices) == sizes[0] > 1:
    # One slice per index of the dcn axis; the rest follows each slice's torus.
    try:
      return mesh_utils.create_hybrid_device_mesh([1, *sizes[1:]], [sizes[0], 1, 1, 1], devices)
    except Exception as e:  # pragma: no cover - depends on the platform's topology support
      logging.warning("hybrid device mesh failed (%s); laying devices out in order", e)
  try:
    return mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # non-TPU topologies without a known physical layout
    return np.asarray(devices).reshape(sizes)


def rules_for_mesh(rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """The rules with the mesh axes that `mesh` lacks (a one-slice mesh has no dcn) dropped."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, (tuple, list)):
      kept = tuple(a for a in mesh_axes if a in mesh.axis_names)
      mesh_axes = kept if len(kept) > 1 else (kept[0] if kept else None)
    elif mesh_axes is not None and mesh_axes not in mesh.axis_names:
      mesh_axes = None
    out.append((logical, mesh_axes))
  return tuple(out)


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
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_mesh(rules, mesh)):
    yield


def logical_axis_size(name: str) -> int:
  """How many ways the active mesh and rules split logical axis `name` (1 outside
  `activate`, or where the rules leave it unsharded). Read at trace time."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes((name,))[0]
  if axes is None:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in (axes if isinstance(axes, tuple) else (axes,)))


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
  specs = logical_specs(boxed_abstract, rules_for_mesh(rules, mesh))
  unboxed = nn.meta.unbox(boxed_abstract)

  def one(leaf, spec):
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, _spec_fits(leaf.shape, spec, mesh))

  return jax.tree.map(one, unboxed, specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch: (dcn,) data, fsdp."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim over (dcn x) data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise ValueError(
        f"batch_size={global_batch} is not divisible by the data-parallel size "
        f"{'*'.join(batch_axes(mesh))}={dp} of mesh {dict(mesh.shape)}; change --config.batch_size or --config.mesh.*")
  if global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} is not divisible by {jax.process_count()} processes")


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Places each process's slice of the batch as one global array over the mesh.

  Every process passes its own [B / process_count, ...] arrays; the result is a
  global [B, ...] jax.Array sharded on the leading dim over the batch axes. A
  process's rows land on its own devices, in the mesh's order of those devices.
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)
