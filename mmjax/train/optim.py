"""optax: schedules, the weight-decay mask, and freezing (frozen params hold no state)."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

from mmjax.treeutil import path_str

FROZEN, TRAINED = "frozen", "trained"


def trainable_mask(params: Any, frozen_patterns: Sequence[str] = ()) -> Any:
  """A tree of bools: False for params whose path fully matches a frozen regex."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(c.fullmatch(path_str(path)) for c in compiled), params)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: kernels and embedding tables, not norms or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path_str(path).rsplit("/", 1)[-1] in ("kernel", "embedding"), params)


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.lr, then cosine (or constant) to cfg.end_lr_ratio * lr."""
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  end = cfg.lr * cfg.get("end_lr_ratio", 0.0)
  kind = cfg.get("schedule", "cosine")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1) if warmup else 0,
                                              max(total_steps, 1), end)
  if kind == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
        [warmup]) if warmup else optax.constant_schedule(cfg.lr)
  raise ValueError(f"unknown optim.schedule {kind!r}; choose 'cosine' or 'constant'")


def make_optimizer(cfg, total_steps: int, mask: Any) -> tuple[optax.GradientTransformation,
                                                                 Callable]:
  """AdamW with clipping and the schedule on trained params; nothing on frozen ones.

  `mask` is the tree from `trainable_mask`. Returns (optimizer, lr schedule).
  """
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  trained = optax.chain(*parts)
  labels = jax.tree.map(lambda t: TRAINED if t else FROZEN, mask)
  tx = optax.multi_transform({TRAINED: trained, FROZEN: optax.set_to_zero()}, labels)
  return tx, lr


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def opt_state_size(opt_state: Any) -> int:
  """Number of floats the optimizer keeps (masked-out entries hold none)."""
  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return sum(int(x.size) for x in leaves
             if not isinstance(x, optax.MaskedNode) and jax.numpy.issubdtype(x.dtype, jax.numpy.floating))
