"""Name-and-layout rules between mmjax param trees and HF state dicts.

A `Rule` ties one mmjax leaf to one HF tensor, or to one HF tensor per layer
stacked on the leaf's leading `layers` axis (the scanned form every mmjax
model trains with). Importing builds each leaf with
`jax.make_array_from_callback`: every device shard reads only the HF tensors of
its own layers, so a checkpoint is streamed from disk onto the mesh without a
second full copy in host memory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from mmjax.models import layers
from mmjax.treeutil import path_str


def identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  """mmjax leaf `path` <-> HF tensor `hf` ("{i}" = the layer when `layers` > 0).

  to_mm maps a HF array to the mmjax layout (per layer); to_hf is its exact
  inverse. hf=None: a param HF does not have, imported as zeros (the model
  converter folds it away on export). hf a tuple of names: to_mm takes their
  arrays and to_hf returns one array per name (None: written by another rule).
  """

  path: str
  hf: str | tuple[str, ...] | None
  to_mm: Callable[..., np.ndarray] = identity
  to_hf: Callable[[np.ndarray], Any] = identity
  layers: int = 0

  @property
  def names(self) -> tuple[str, ...]:
    return () if self.hf is None else (self.hf,) if isinstance(self.hf, str) else self.hf

  def layer_names(self, i: int | None) -> tuple[str, ...]:
    return tuple(n.format(i=i) if self.layers else n for n in self.names)

  def hf_names(self) -> list[str]:
    items = range(self.layers) if self.layers else [None]
    return [n for i in items for n in self.layer_names(i)]


# -- layout transforms (torch Linear is [out, in]; Flax Dense is [in, out]) --

def linear(x):
  """Dense kernel <-> Linear weight (the same map both ways)."""
  return x.T


def heads_in(num_heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """[N*H, D] q/k/v weight <-> [D, N, H] kernel."""
  return (lambda w: w.T.reshape(w.shape[1], num_heads, head_dim),
          lambda k: k.reshape(k.shape[0], num_heads * head_dim).T)


def heads_bias(num_heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """[N*H] bias <-> [N, H]."""
  return (lambda b: b.reshape(num_heads, head_dim), lambda b: b.reshape(num_heads * head_dim))


def heads_out(num_heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """[D, N*H] output weight <-> [N, H, D] kernel."""
  return (lambda w: w.T.reshape(num_heads, head_dim, w.shape[0]),
          lambda k: k.reshape(num_heads * head_dim, k.shape[-1]).T)


def attention_rules(prefix: str, hf_prefix: str, depth: int, num_heads: int, head_dim: int,
                    num_kv_heads: int | None = None, bias: bool = True,
                    names: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj"),
                    ) -> list[Rule]:
  """The four projections of one (scanned) attention module."""
  kv = num_kv_heads or num_heads
  out = []
  for ours, theirs, n in zip(("query", "key", "value"), names[:3], (num_heads, kv, kv)):
    out.append(Rule(f"{prefix}/{ours}/kernel", f"{hf_prefix}.{theirs}.weight",
                    *heads_in(n, head_dim), layers=depth))
    if bias:
      out.append(Rule(f"{prefix}/{ours}/bias", f"{hf_prefix}.{theirs}.bias",
                      *heads_bias(n, head_dim), layers=depth))
  out.append(Rule(f"{prefix}/out/kernel", f"{hf_prefix}.{names[3]}.weight",
                  *heads_out(num_heads, head_dim), layers=depth))
  if bias:
    out.append(Rule(f"{prefix}/out/bias", f"{hf_prefix}.{names[3]}.bias", layers=depth))
  return out


def dense_rules(path: str, hf: str, depth: int = 0, bias: bool = True) -> list[Rule]:
  out = [Rule(f"{path}/kernel", f"{hf}.weight", linear, linear, layers=depth)]
  if bias:
    out.append(Rule(f"{path}/bias", f"{hf}.bias", layers=depth))
  return out


def norm_rules(path: str, hf: str, depth: int = 0, bias: bool = True) -> list[Rule]:
  out = [Rule(f"{path}/scale", f"{hf}.weight", layers=depth)]
  if bias:
    out.append(Rule(f"{path}/bias", f"{hf}.bias", layers=depth))
  return out


# -- import ----------------------------------------------------------------

class ConversionError(ValueError):
  """A checkpoint and a model config that do not fit together."""


def load_params(reader, rules: Iterable[Rule], abstract: Any,
                ignore: Sequence[str] = ()) -> Any:
  """Builds the param tree `abstract` (ShapeDtypeStructs, with shardings where
  the params should live) from the HF tensors of `reader`.

  Every leaf needs a rule and every HF tensor must be used, except names
  matching a regex in `ignore` (buffers such as `position_ids`); anything else
  is an error naming the tensors, so no weight is dropped silently.
  """
  by_path = {r.path: r for r in rules}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  missing = [path_str(p) for p, _ in leaves if path_str(p) not in by_path]
  if missing:
    raise ConversionError(f"no conversion rule for the mmjax params {missing[:10]}")
  wanted = {n for r in by_path.values() for n in r.hf_names()}
  absent = sorted(n for n in wanted if n not in reader)
  if absent:
    raise ConversionError(f"{reader.directory} lacks the tensors {absent[:10]} "
                          f"({len(absent)} in all) that this model config needs")
  unused = sorted(k for k in reader.keys()
                  if k not in wanted and not any(re.search(p, k) for p in ignore))
  if unused:
    raise ConversionError(
        f"{reader.directory} holds tensors that the mmjax model has no place for: {unused[:10]} "
        f"({len(unused)} in all); the checkpoint uses a feature this converter does not support")
  arrays = [_build_leaf(reader, by_path[path_str(p)], leaf) for p, leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, arrays)


def _build_leaf(reader, rule: Rule, leaf) -> jax.Array:
  shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
  per_item = shape[1:] if rule.layers else shape
  if rule.layers and shape[:1] != (rule.layers,):
    raise ConversionError(f"{rule.path}: the model has {shape[:1]} layers, the rule {rule.layers}")
  cache: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same block

  def one(i: int | None) -> np.ndarray:
    names = rule.layer_names(i)
    if not names:
      return np.zeros(per_item, dtype)
    value = rule.to_mm(*[reader.get(n) for n in names])
    if tuple(value.shape) != per_item:
      raise ConversionError(
          f"HF tensor {names[0]} {reader.shape(names[0])} does not fit the mmjax param "
          f"{rule.path} {per_item}: the config and the weights disagree")
    return np.asarray(value, dtype)

  def block(index: tuple) -> np.ndarray:
    if not rule.layers:
      if () not in cache:
        cache[()] = one(None)
      return cache[()][index]
    key = index[0].indices(rule.layers)
    if key not in cache:
      cache[key] = np.stack([one(i) for i in range(*key)])
    return cache[key][(slice(None),) + tuple(index[1:])]

  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.make_array_from_callback(shape, sharding, block)


# -- export ----------------------------------------------------------------

def export_tensors(params: Any, rules: Iterable[Rule], dtype: Any = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every HF tensor, one layer at a time (a scanned leaf
  is fetched from the devices slice by slice). `dtype` None keeps float32."""
  flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for rule in rules:
    if not rule.names:
      continue
    if rule.path not in flat:
      raise ConversionError(f"the params have no {rule.path}; is this the right model config?")
    leaf = flat[rule.path]
    for i in (range(rule.layers) if rule.layers else [None]):
      values = rule.to_hf(_host(leaf if i is None else leaf[i]))
      if isinstance(rule.hf, str):
        values = (values,)
      for name, value in zip(rule.layer_names(i), values):
        if value is not None:
          yield name, value if dtype is None else np.asarray(value).astype(dtype)


def _host(x) -> np.ndarray:
  """The whole array on this host (gathered from the other processes' shards)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def scanned(params: dict) -> dict:
  """Params with unrolled stacks ({layers_0, layers_1, ...}) in the scanned form."""
  if not isinstance(params, dict):
    return params
  if "layers_0" in params:
    depth = sum(1 for k in params if re.fullmatch(r"layers_\d+", k))
    params = layers.stack_layers(params, depth)
  return {k: scanned(v) for k, v in params.items()}
