"""Evaluation across processes: each process evaluates its share, results are gathered once.

Every Task evaluates through `run_batches` or `run_rows`, so that a mesh whose
batch axes span processes evaluates the same split, to the same numbers, as
one process does:

- `run_batches(fn, batches, mesh)`: each process passes its own batches (an
  eval iterator already split by process, the same number of batches on each);
- `run_rows(fn, rows, batch_size, mesh)`: every process holds the same host
  arrays (prompts, packed documents, questions) and takes a contiguous block.

`fn(batch)` gets the batch as global arrays [B, ...] (B the global batch; a
bool `mask` marks the real rows) and returns a dict of

- per-row arrays [B, ...] (embeddings, predictions, per-row sums): each
  process keeps its own rows (its addressable shards), and one
  `process_allgather` at the end brings every process's rows to every process;
- scalars (sums over the batch, already reduced over every process by the
  collective inside jit, so replicated): summed over the batches in float64.
  They must count only rows whose `mask` is True.

Nothing is fetched from a global array that spans other processes.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import parallel


def local_rows(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a global array split on its leading dim over the
  batch axes, in the order of the process's host data."""
  if x.is_fully_addressable:
    return np.asarray(x)
  # Replicate every dim but the batch one, so that each shard holds whole rows.
  x = jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def replicated_value(x: jax.Array) -> np.ndarray:
  """A replicated global array (a scalar summed inside jit) on this host."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def gather(tree):
  """Every process's host arrays, concatenated in process order on every host."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def run_batches(fn: Callable[[dict], Mapping[str, jax.Array]],
                batches: Iterable[Mapping[str, np.ndarray]], mesh) -> dict:
  """fn over this process's batches; per-row outputs of every process (with
  `mask`) as numpy arrays, scalar outputs summed as floats."""
  rows: dict[str, list[np.ndarray]] = {}
  sums: dict[str, list[jax.Array]] = {}
  for batch in batches:
    out = fn(parallel.host_to_global(dict(batch), mesh))
    rows.setdefault("mask", []).append(np.asarray(batch["mask"]).astype(bool))
    for key, value in out.items():
      if key == "mask":
        raise ValueError("an eval function's output may not be named 'mask'")
      if value.ndim == 0:
        sums.setdefault(key, []).append(value)
      else:
        rows.setdefault(key, []).append(local_rows(value, mesh))
  if not rows:
    raise ValueError("no eval batches: the eval split is empty")
  gathered = gather({k: np.concatenate(v) for k, v in rows.items()})
  totals = jax.device_get({k: [replicated_value(x) for x in v] for k, v in sums.items()})
  return {**gathered, **{k: float(np.sum(np.asarray(v, np.float64))) for k, v in totals.items()}}


def run_rows(fn: Callable[[dict], Mapping[str, jax.Array]], rows: Mapping[str, np.ndarray],
             batch_size: int, mesh) -> dict:
  """fn over host arrays that every process holds alike, N rows each; returns
  the per-row outputs of all N rows in their order, and the scalar sums.

  The rows are padded (repeating the last, `mask` False) to whole global
  batches of `batch_size` (rounded up to split over the batch axes and the
  processes); process p evaluates the p-th contiguous block of them.
  """
  n = len(next(iter(rows.values())))
  if n == 0:
    raise ValueError("no rows to evaluate")
  procs = jax.process_count()
  step = math.lcm(parallel.data_parallel_size(mesh), procs)
  batch_size = -(-int(batch_size) // step) * step
  total = -(-n // batch_size) * batch_size
  block, per_process = total // procs, batch_size // procs
  index = np.arange(jax.process_index() * block, (jax.process_index() + 1) * block)
  local = {k: np.asarray(v)[np.minimum(index, n - 1)] for k, v in rows.items()}
  local["mask"] = index < n
  batches = ({k: v[i:i + per_process] for k, v in local.items()}
             for i in range(0, block, per_process))
  out = run_batches(fn, batches, mesh)
  return {k: v[:n] if isinstance(v, np.ndarray) else v for k, v in out.items()}
