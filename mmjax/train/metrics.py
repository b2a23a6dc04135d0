"""Metrics out of a run: metrics.jsonl, TensorBoard events, MFU, and report.png."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip (the vendors' spec pages), matched in order against
# device_kind. A v5p calls itself "TPU v5" and a v5e "TPU v5 lite": the lite
# entries come first.
PEAK_FLOPS = (("h100", 989e12), ("h200", 989e12), ("v5p", 459e12), ("v5 lite", 197e12),
              ("v5e", 197e12), ("v5", 459e12), ("v6", 918e12), ("v4", 275e12),
              ("a100", 312e12))


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """This host's float32 matmul FLOP/s: the best of `repeats` timed chains of
  four [n, n] @ [n, n] products (a chain, so that dispatch does not count)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32) / math.sqrt(n)

  @jax.jit
  def chain(x):
    for _ in range(4):
      x = x @ a
    return x

  chain(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    chain(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 4 * 2 * n ** 3 / best


def table_peak(device_kind: str) -> float | None:
  """The table's peak FLOP/s for one chip of this kind; None if it is not listed."""
  for key, value in PEAK_FLOPS:
    if key in device_kind.lower():
      return value
  return None


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run together, where the number came from)."""
  kind = jax.devices()[0].device_kind
  value = table_peak(kind)
  if value is not None:
    return value * jax.device_count(), f"{kind} table"
  # Fake CPU devices share one host's cores: the host's matmul peak is the peak.
  return measure_matmul_peak() * jax.process_count(), "measured float32 matmul"


def _drop_rows_after(path: str, step: int) -> None:
  """Keeps the rows of steps <= step (none when a run starts over at 0)."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if step > 0 and json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):  # a line cut short by a kill
      continue
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsWriter:
  """Process 0 appends one JSON object per logged step and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    """resume_step: the step a run starts from (its checkpoint's, 0 without
    one); rows logged after it (by a run that died before its next checkpoint)
    are dropped, since this run logs those steps again."""
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None and os.path.exists(self.path):
        _drop_rows_after(self.path, resume_step)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard files are a convenience, not a requirement
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _scalar(v):
  v = np.asarray(v)
  if v.dtype.kind in "iu":
    return int(v)
  return float(v)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_report(workdir: str, title: str = "") -> str | None:
  """report.png: training curves on the left, evaluation over steps on the right."""
  rows = read_metrics(workdir)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def series(key):
    pts = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
    return zip(*pts) if pts else ((), ())

  eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")
                      and not k.endswith("_count")})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  x, y = series("train/loss")
  axes[0].plot(x, y, label="train/loss")
  for k in sorted({k for r in rows for k in r if k.startswith("eval/") and "loss" in k}):
    axes[0].plot(*series(k), "o-", label=k)
  axes[0].set_xlabel("step"), axes[0].set_title("loss"), axes[0].legend()
  x, y = series("train/lr")
  axes[1].plot(x, y, color="tab:orange")
  axes[1].set_xlabel("step"), axes[1].set_title("learning rate")
  scores = [k for k in eval_keys if "loss" not in k]  # losses are in the first panel
  for k in scores:
    axes[2].plot(*series(k), "o-", label=k.removeprefix("eval/"))
  axes[2].set_xlabel("step"), axes[2].set_title("evaluation")
  axes[2].set_ylim(0, 1.02)
  if scores:
    axes[2].legend(fontsize=7)
  fig.suptitle(title or os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, "report.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
