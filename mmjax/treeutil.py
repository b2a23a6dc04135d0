"""Small helpers for naming the leaves of param trees."""

from __future__ import annotations

from typing import Any, Sequence

import jax


def path_str(path: Sequence[Any]) -> str:
  """A tree path as 'a/b/c' (what freezing patterns and error messages use)."""
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def flat_shapes(tree: Any) -> dict[str, tuple]:
  """'a/b/c' -> shape for every array-like leaf."""
  return {path_str(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if getattr(leaf, "shape", None) is not None}
