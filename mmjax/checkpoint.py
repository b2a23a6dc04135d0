"""Orbax checkpoints: async save every N steps, keep K, data-iterator state beside
the train state, restore onto whatever mesh the current config builds."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax.treeutil import flat_shapes


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not fit the model of the current config."""


class CheckpointSaveError(OSError):
  """A save did not complete (disk full, storage gone); earlier steps are intact."""


# Orbax splits each replicated array's save across its replicas ("replica
# parallel"), which costs one compiled slicing program per array and shape on
# the first save: for small arrays (biases, norms, a test's whole model) that
# compile takes longer than the write it spreads. Arrays whose share per
# replica is under this many bytes are written whole by their first replica.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20

# What a finished save leaves in a step folder; a folder missing any is torn.
_COMPLETE = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


def torn_reason(step_dir: str) -> str | None:
  """Why the step folder is not a complete checkpoint, or None if it is."""
  missing = [f for f in _COMPLETE if not os.path.isfile(os.path.join(step_dir, f))]
  if missing:
    return f"missing {missing}"
  for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
    try:
      with open(os.path.join(step_dir, name)) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      return f"unreadable {name} ({e})"
  return None


_registered = False


def _register_array_handler() -> None:
  """Orbax's handler for jax.Array, with REPLICA_PARALLEL_MIN_BYTES (once per process)."""
  global _registered
  if _registered:
    return
  from orbax.checkpoint._src.metadata import array_metadata_store  # the default's store
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  _registered = True


class Checkpointer:
  """`save` is asynchronous; `wait` blocks until the last save is on disk.

  On opening, step folders that are not complete checkpoints (a save killed
  midway, a copy cut short) are moved to `<directory>.torn/` with a warning
  naming them: they are never loaded, and their step can be saved again.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._saving: int | None = None  # the step of the save in flight
    self._set_aside_torn()
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def _set_aside_torn(self) -> None:
    """Every process looks; process 0 moves the torn folders; all wait for it.

    All have looked before process 0 moves anything (a barrier), so that all
    see the same folders and meet the same barriers after: a process that
    looked after the move would skip the wait and meet Orbax's next barrier
    alone."""
    torn = self._torn_folders()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mmjax.checkpoint: looked for torn folders")
    for name, reason in torn:
      logging.warning("checkpoint %s is incomplete (%s): not loaded, moved to %s.torn/",
                      os.path.join(self.directory, name), reason, self.directory)
    if torn:
      self._move_aside([name for name, _ in torn])

  def _torn_folders(self) -> list[tuple[str, str]]:
    """(name, why) of each step folder that is not a whole checkpoint."""
    if not os.path.isdir(self.directory):
      return []
    torn = []
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if not os.path.isdir(path):
        continue
      if re.fullmatch(r"\d+", name):
        reason = torn_reason(path)
      elif re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", name):
        reason = "a save that did not finish"
      else:
        continue
      if reason:
        torn.append((name, reason))
    return torn

  def _move_aside(self, names: list[str]) -> None:
    """Process 0 moves the step folders to <directory>.torn/; every process waits."""
    if jax.process_index() == 0:
      aside = self.directory + ".torn"
      os.makedirs(aside, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for name in names:
        os.rename(os.path.join(self.directory, name), os.path.join(aside, f"{name}.{stamp}"))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mmjax.checkpoint: torn folders set aside")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
    """Starts saving `step` (asynchronously), after the previous save has
    finished. Raises CheckpointSaveError when either cannot be written."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    try:
      self.wait()  # a failure of the previous save is reported as that step's
      self._saving = int(step)
      return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)
    except CheckpointSaveError:
      raise
    except Exception as e:
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, error: Exception) -> CheckpointSaveError:
    steps = [s for s in self.manager.all_steps() if s != int(step)]
    kept = (f"step {max(steps)} is the newest complete checkpoint" if steps
            else "there is no earlier checkpoint")
    return CheckpointSaveError(
        f"saving checkpoint step {step} to {self.directory} failed "
        f"({type(error).__name__}: {error}); {kept}. Free space on that disk (or point "
        f"--workdir elsewhere) and run the same command again to resume")

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, Any]:
    """Restores onto `target`: a tree of jax.ShapeDtypeStruct with shardings (or
    arrays), so a checkpoint saved on one mesh lands on another. Returns
    (state, data_state or None)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self._check_compatible(target, step)
    abstract = jax.tree.map(_abstract, target)
    args = {"state": ocp.args.StandardRestore(abstract)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      args["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["data"] if has_data else None

  def restore_newest(self, target: Any) -> tuple[int | None, Any, Any]:
    """(step, state, data_state) of the newest checkpoint that restores, or
    (None, None, None) when there is none. A step that fails to read (a
    damaged file) is set aside with a warning and the one before it is tried;
    a checkpoint of another model is an error."""
    while (step := self.latest_step()) is not None:
      try:
        return (step, *self.restore(target, step))
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable file of that step
        path = os.path.join(self.directory, str(step))
        logging.warning("checkpoint %s cannot be read (%s: %s): not loaded, moved to %s.torn/",
                        path, type(e).__name__, str(e)[:300], self.directory)
        self._move_aside([str(step)])
        self.manager.reload()
    return None, None, None

  def _check_compatible(self, target: Any, step: int) -> None:
    meta = self.manager.item_metadata(step)["state"]
    saved = flat_shapes(getattr(meta, "tree", meta))
    wanted = flat_shapes(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shape = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if missing or extra or shape:
      lines = []
      if missing:
        lines.append(f"missing from the checkpoint: {missing[:10]}")
      if extra:
        lines.append(f"not in the model: {extra[:10]}")
      if shape:
        lines.append("shape differs: " + ", ".join(
            f"{k} saved {saved[k]} vs model {wanted[k]}" for k in shape[:10]))
      raise CheckpointMismatchError(
          f"checkpoint {self.directory} step {step} does not match the model of this config; "
          + "; ".join(lines))

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self._saving, e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore_subtree(directory: str, path: tuple[str, ...], target: Any,
                    step: int | None = None, ignore_extra: bool = False) -> Any:
  """Restores one sub-tree of another run's train state, e.g. ("params", "vision").

  `directory` is a workdir (or its checkpoints folder); `target` is a tree of
  arrays or jax.ShapeDtypeStruct (with shardings) shaped like the sub-tree.
  Only that sub-tree is read (no optimizer state), onto the target's shardings.
  ignore_extra: saved params that the target lacks are skipped (a CLIP tower's
  pooling head, when LLaVA reads only its tokens); otherwise they are an error.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}: train that run first")
    meta = manager.item_metadata(step)["state"]
    saved = getattr(meta, "tree", meta)
    for key in path:
      if not isinstance(saved, dict) or key not in saved:
        raise CheckpointMismatchError(
            f"checkpoint {directory} step {step} has no {'/'.join(path)} (at {key!r}; it has "
            f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__})")
      saved = saved[key]
    saved_shapes, wanted = flat_shapes(saved), flat_shapes(target)
    if ignore_extra:
      saved_shapes = {k: v for k, v in saved_shapes.items() if k in wanted}
    if saved_shapes != wanted:
      missing = sorted(set(wanted) - set(saved_shapes))
      extra = sorted(set(saved_shapes) - set(wanted))
      shape = sorted(k for k in set(saved_shapes) & set(wanted) if saved_shapes[k] != wanted[k])
      raise CheckpointMismatchError(
          f"{'/'.join(path)} of checkpoint {directory} step {step} does not fit the model: "
          f"missing {missing[:5]}, not in the model {extra[:5]}, shape differs "
          + ", ".join(f"{k} saved {saved_shapes[k]} vs model {wanted[k]}" for k in shape[:5])
          + "; make the config's model match the run it loads from")
    abstract = jax.tree.map(_abstract, target)
    item = abstract
    for key in reversed(path):
      item = {key: item}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))["state"]
  finally:
    manager.close()
  for key in path:
    restored = restored[key]
  return restored
