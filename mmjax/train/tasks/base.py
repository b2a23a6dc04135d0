"""The Task protocol, the registry of Tasks, and what every family shares.

The step and the loop are shared; a Task says only what differs between model
families: the model, its init, its loss, its data and its evaluation.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, Protocol

import jax
import ml_collections


class Task(Protocol):
  """What the step and the loop ask of a model family.

  A Task is built from the whole experiment config; `with_data=False` builds it
  from the config alone (no tokenizer, no dataset), for `mmjax.plan`.
  """

  batch_keys: tuple[str, ...]  # the batch entries the step reads
  frozen: tuple[str, ...]      # regexes ('vision/.*') of params that do not train

  def __init__(self, config: ml_collections.ConfigDict, with_data: bool = True): ...

  def init(self, rng: jax.Array) -> Any:
    """Boxed params (with logical axis names) of the model."""

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the batch entries."""

  def loss(self, params: Any, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """(loss, aux dict of scalars), traced inside the jitted step."""

  def train_batches(self, per_process_batch: int, seed: int, **shard) -> Iterator[dict]:
    """The train iterator, with get_state / set_state; `shard` is shard_index= and
    shard_count= when the config sets data_shards."""

  def evaluate(self, params: Any, mesh: Any, rules: Any) -> dict[str, float]:
    """Metrics (logged as eval/<key>): each process evaluates its share of the
    split through mmjax.eval.sharded, with jitted functions built in __init__."""

  def flops_per_example(self) -> float:
    """Training FLOPs per example, for MFU."""

  # Optional: initial_params(params, shardings) -> params, to start from other runs.


TASKS: dict[str, Callable[..., Task]] = {}

# The modules whose Tasks register themselves on import (mmjax.train.tasks
# imports them all).
FAMILIES = ("mmjax.train.tasks.clip", "mmjax.train.tasks.vit", "mmjax.train.tasks.llava")


def register(name: str):
  """Class decorator: the Task of `config.task == name`."""
  def wrap(cls):
    TASKS[name] = cls
    return cls
  return wrap


def build_task(config, **kwargs) -> Task:
  """The config's Task; kwargs go to its constructor (with_data=False: see Task)."""
  for module in FAMILIES:
    importlib.import_module(module)
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r} in config; known: {sorted(TASKS)}")
  return TASKS[config.task](config, **kwargs)


def dataclass_from(cls, cfg, **overrides):
  """A frozen config dataclass from a ConfigDict (lists become tuples), naming
  unknown keys."""
  values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  values.update(overrides)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
  return cls(**values)


def with_shardings(params, shardings):
  """Abstract arrays of `params` placed by `shardings`: a restore target."""
  return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                      params, shardings)
