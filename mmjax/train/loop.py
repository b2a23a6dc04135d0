"""The training loop shared by every task: sharded init or resume, the jitted step,
metrics, evaluation, checkpoints, profiling and preemption."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from mmjax import backend, checkpoint, parallel
from mmjax.models import attention
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim, step as step_lib, tasks


class NonFiniteLossError(FloatingPointError):
  pass


class _Preemption:
  """Turns SIGTERM into a flag that every process agrees on at the same step.

  Agreeing takes an all-gather, which waits for the step in flight (a host
  sync); with several processes it runs only every `check_every` steps, so the
  host keeps dispatching ahead of the devices in between.
  """

  def __init__(self, check_every: int = 10):
    self.flag = False
    self.check_every = max(int(check_every), 1)
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    if step % self.check_every:
      return False
    return bool(multihost_utils.process_allgather(np.array(self.flag)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def setup(config, workdir: str, devices=None):
  """Mesh, task, optimizer, state shardings and checkpointer: what training and
  evaluation share."""
  backend.configure(config.get("cpu_tuning", "auto"), list(devices or jax.devices()))
  s = build(config, devices)
  s["ckpt"] = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      keep=config.keep_checkpoints,
                                      async_save=config.get("async_checkpoints", True))
  return s


def check_attention(model_config, platform: str, where: str = "model") -> None:
  """Every `attention_impl` under the model config, checked by name and against
  the platform the run compiles for (a ValueError naming the config key)."""
  for key, value in model_config.items():
    if key == "attention_impl":
      attention.check_runnable(value, platform, f"--config.{where}.{key}")
    elif hasattr(value, "items"):
      check_attention(value, platform, f"{where}.{key}")


def build(config, devices=None, task=None) -> dict[str, Any]:
  """Mesh, task, optimizer and state shardings, touching no files (mmjax.plan
  passes the devices of a TPU topology and a task built without data)."""
  mesh = parallel.make_mesh(config.mesh, devices)
  check_attention(config.get("model", {}), mesh.devices.flat[0].platform)
  rules = parallel.rules_from_config(config.get("rules"))
  parallel.check_batch_size(config.batch_size, mesh)
  task = tasks.build_task(config) if task is None else task
  boxed = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(config.seed)))
  mask = optim.trainable_mask(nn.meta.unbox(boxed), task.frozen)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps, mask)
  abstract, shardings = step_lib.state_shardings(task, tx, config.seed, mesh, rules)
  return dict(mesh=mesh, rules=rules, task=task, mask=mask, tx=tx, schedule=schedule,
              abstract=abstract, shardings=shardings)


def restore_target(abstract, shardings):
  """Abstract arrays with their shardings. A frozen param's optimizer state is an
  empty MaskedNode, for which the shardings tree holds a (prefix) sharding."""
  def one(a, s):
    return a if isinstance(a, optax.MaskedNode) else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                          sharding=s)
  return jax.tree.map(one, abstract, shardings, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def train(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns
  the last logged metrics."""
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  s = setup(config, workdir)
  mesh, rules, task, ckpt = s["mesh"], s["rules"], s["task"], s["ckpt"]
  data = train_data(task, config)

  start, state, data_state = ckpt.restore_newest(restore_target(s["abstract"], s["shardings"]))
  if start is not None:
    if data_state is not None:
      data.set_state(_local_data_state(data_state))
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    state = step_lib.create_state(task, s["tx"], config.seed, mesh, rules, s["shardings"])
    if hasattr(task, "initial_params"):  # a later stage starts from earlier runs
      state = state.replace(params=task.initial_params(state.params, s["shardings"].params))
    start = 0

  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(task, s["tx"], s["mask"], s["schedule"],
                               config.optim.get("grad_accum", 1)),
      s["shardings"], mesh, task.batch_spec(config.batch_size))
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main,
                                     resume_step=start)
  peak, peak_source = metrics_lib.peak_flops()
  flops_per_example = task.flops_per_example()
  logging.info("model FLOPs per example %.3g; peak %.3g FLOP/s (%s)",
               flops_per_example, peak, peak_source)

  preempt = _Preemption(config.get("preemption_check_every", 10))
  progress = _progress(start, config.total_steps, is_main)
  profile = _Profiler(workdir, start, config.get("profile_steps", 0))
  last_logged: dict[str, Any] = {}
  pending: list[dict] = []
  t_last, steps_since = time.perf_counter(), 0
  step = start
  try:
    if start == 0 and config.get("eval_at_start", False):
      # The starting point's numbers (a stage's baseline), logged as step 0.
      start_row = {f"eval/{k}": v for k, v in task.evaluate(state.params, mesh, rules).items()}
      writer.write(0, start_row)
      if is_main:
        logging.info("step 0: %s", {k: round(v, 4) for k, v in start_row.items()})
      t_last = time.perf_counter()
    with parallel.activate(mesh, rules):
      while step < config.total_steps:
        profile.maybe_start(step)
        batch = next(data)
        batch = parallel.host_to_global({k: batch[k] for k in task.batch_keys}, mesh)
        state, step_metrics = train_step(state, batch)
        step += 1
        steps_since += 1
        profile.maybe_stop(step)
        pending.append(step_metrics)
        progress.update(1)

        row: dict[str, Any] = {}
        if step % config.log_every == 0 or step == config.total_steps:
          row.update(_reduce(pending))
          pending = []
          _check_finite(row, step, ckpt)
          elapsed = time.perf_counter() - t_last
          if step - start > steps_since:  # not the first interval (compilation)
            ex_per_sec = steps_since * config.batch_size / elapsed
            row["perf/examples_per_sec"] = ex_per_sec
            row["perf/examples_per_sec_per_device"] = ex_per_sec / jax.device_count()
            row["perf/mfu"] = ex_per_sec * flops_per_example / peak
            row["perf/step_time_sec"] = elapsed / steps_since
          skipped = _skipped(data)
          if skipped:  # samples this process could not use: no image, no caption, bad bytes
            row["data/skipped"] = float(skipped)
          progress.set_postfix(loss=f"{row['train/loss']:.4f}",
                               ex_s=f"{row.get('perf/examples_per_sec', 0):.0f}")
        if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
          row.update({f"eval/{k}": v for k, v in task.evaluate(state.params, mesh, rules).items()})
        preempted = preempt.requested(step)
        if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
          if pending:  # never save params that produced a non-finite loss
            _check_finite(_reduce(pending[-1:]), step, ckpt)
          ckpt.save(step, state, _global_data_state(data.get_state()), force=True)
        if row:
          writer.write(step, row)
          last_logged = {"step": step, **row}
          if any(k.startswith("eval/") for k in row) and is_main:
            logging.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items()
                                               if k.startswith("eval/")})
          t_last, steps_since = time.perf_counter(), 0
        if preempted:
          logging.warning("SIGTERM: saved step %d to %s; exiting", step, ckpt.directory)
          break
  finally:
    progress.close()
    profile.close()
    preempt.restore()
    ckpt.close()
    writer.close()
    if hasattr(data, "close"):
      data.close()
  if is_main and step >= config.total_steps:
    metrics_lib.plot_report(workdir, title=f"{config.task}: {os.path.basename(workdir)}")
  return last_logged


def train_data(task, config):
  """This process's train batches: [batch_size / process_count, ...] per step.

  With `data_shards` = S > 0 the data is read as S shards of batch_size / S rows
  per step each; process p of P reads shards p*S/P .. (p+1)*S/P - 1 and stacks
  them in order. The global batch (every shard, in shard order, over the
  devices in mesh order) is then the same for every P that divides S, so a run
  on 2 processes sees the batches of the same run on 1, and either resumes the
  other's checkpoint. With 0, each process is one shard (S = P).
  """
  n_proc, shards = jax.process_count(), int(config.get("data_shards", 0) or 0)
  if not shards:
    return task.train_batches(config.batch_size // n_proc, config.seed)
  if shards % n_proc or config.batch_size % shards:
    raise ValueError(f"data_shards={shards} must be a multiple of the {n_proc} processes and "
                     f"divide batch_size={config.batch_size}; change --config.data_shards")
  first = jax.process_index() * (shards // n_proc)
  return _ShardedBatches({i: task.train_batches(config.batch_size // shards, config.seed,
                                                shard_index=i, shard_count=shards)
                          for i in range(first, first + shards // n_proc)})


def _skipped(data) -> int:
  """Samples the data source of this process has skipped so far (worker processes
  of grain count their own and are not included)."""
  iterators = getattr(data, "iterators", {"": data}).values()
  return sum(int(getattr(it, "num_bad_images", 0) or 0) for it in iterators)


class _ShardedBatches:
  """Several data shards read in lock step, their batches stacked in shard order."""

  def __init__(self, iterators: dict[int, Any]):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iterators.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": {str(i): it.get_state() for i, it in self.iterators.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get("shards", {})
    missing = sorted(set(map(str, self.iterators)) - set(saved))
    if missing:
      raise ValueError(f"the checkpoint's data state has no shards {missing} (it has "
                       f"{sorted(saved, key=int)}); resume with the data_shards it was saved with")
    for i, it in self.iterators.items():
      it.set_state(saved[str(i)])

  def close(self) -> None:
    for it in self.iterators.values():
      if hasattr(it, "close"):
        it.close()


def _global_data_state(state: dict[str, Any]) -> dict[str, Any]:
  """Every process's data state in one (Orbax writes JSON from process 0 only)."""
  if jax.process_count() == 1:
    return state
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([raw.size])).ravel()
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  states = [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]
  if all("shards" in s for s in states):
    return {"shards": {k: v for s in states for k, v in s["shards"].items()}}
  return {"processes": states}


def _local_data_state(state: dict[str, Any]) -> dict[str, Any]:
  """This process's part of a state written by `_global_data_state`."""
  if "processes" not in state:
    return state
  if len(state["processes"]) != jax.process_count():
    raise ValueError(
        f"the checkpoint's data state is from {len(state['processes'])} processes, this run has "
        f"{jax.process_count()}: their batches differ. Set --config.data_shards (a multiple of "
        f"both counts) before the first run to resume across process counts")
  return state["processes"][jax.process_index()]


def _reduce(rows: list[dict]) -> dict[str, float]:
  """Means over the steps since the last log; one host sync for all of them."""
  rows = jax.device_get(rows)
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _check_finite(row: dict, step: int, ckpt) -> None:
  loss = row.get("train/loss")
  if loss is not None and not np.isfinite(loss):
    raise NonFiniteLossError(
        f"non-finite loss {loss} at step {step}; stopping. The last good checkpoint is step "
        f"{ckpt.latest_step()} in {ckpt.directory}: lower optim.lr or raise warmup and resume")


def _progress(start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
              dynamic_ncols=True)


class _Profiler:
  """`profile_steps` = N > 0 traces N steps, starting two steps after (re)start."""

  def __init__(self, workdir: str, start: int, n: int):
    self.first = start + 2 if n else None
    self.last = start + 2 + n if n else None
    self.dir = os.path.join(workdir, "profile")
    self.active = False

  def maybe_start(self, step: int) -> None:
    if self.first is not None and step == self.first and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def maybe_stop(self, step: int) -> None:
    if self.active and step >= self.last:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile written to %s", self.dir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def evaluate(config, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint of `workdir`; writes workdir/eval.json."""
  s = setup(config, workdir)
  step = s["ckpt"].latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
  state, _ = s["ckpt"].restore(restore_target(s["abstract"], s["shardings"]), step)
  results = {"step": step, **{f"eval/{k}": v for k, v in
                              s["task"].evaluate(state.params, s["mesh"], s["rules"]).items()}}
  s["ckpt"].close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
