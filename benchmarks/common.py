"""What the step benchmarks share: XLA's CPU settings, timing two steps in
alternation, this host's matmul peak, and the table and JSON they report.

`configure_host()` must run before the first `import jax` of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

# XLA's CPU flags the step benchmarks run with (docs/performance.md): Eigen's
# multi-threaded contractions (the default, kept explicit).
CPU_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=true",)


def configure_host(xla_flags: tuple[str, ...] = CPU_XLA_FLAGS) -> None:
  """Re-executes the process with the malloc tunables that `python -m mmjax.train`
  runs with (mmjax/hostenv.py; a peer in the same process gets them too), then
  adds `xla_flags` to XLA_FLAGS (flags already set win). Call before importing jax.
  """
  if "jax" in sys.modules:
    raise RuntimeError("benchmarks.common.configure_host() must run before `import jax`")
  from mmjax import hostenv
  hostenv.reexec_with_tuned_malloc()
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in xla_flags if f.split("=")[0] not in flags]
  os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


# Where a run of a benchmark's default selection writes its results: one file per
# benchmark and machine kind, BENCHMARK_KIND.json, replaced by the next such run.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict[str, Any]:
  """What the numbers were measured on, with the date and the load average."""
  info = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
          "cpus": os.cpu_count(),
          "processor": _cpu_model(), "vector_isa": _vector_isa(),
          "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  import jax
  info["jax"] = jax.__version__
  info["device"] = jax.devices()[0].device_kind
  return info


def machine_kind(info: dict[str, Any]) -> str:
  """The kind of machine of `machine()`'s description, as results files name it:
  `cpu2-amd-epyc-avx2` (cores, processor, widest vector unit) on a CPU, the
  accelerator's own kind otherwise (`nvidia-h100-80gb-hbm3`, `tpu-v5p`)."""
  if info["device"].lower() != "cpu":
    return _slug(info["device"])
  isa = info.get("vector_isa") or []
  width = "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa else "base"
  return f"cpu{info['cpus']}-{_slug(info['processor'])}-{width}"


def _slug(text: str) -> str:
  text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\d+-core processor", " ", text.lower())
  return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def is_default_run(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   ignore: tuple[str, ...] = ("out", "repeats", "steps", "warmup",
                                              "data_dir")) -> bool:
  """Whether `args` measure what the benchmark measures by default (the number
  of repeats aside): only such a run replaces the results file."""
  defaults = vars(parser.parse_args([]))
  return all(v == defaults[k] for k, v in vars(args).items() if k not in ignore)


def save(benchmark: str, results: dict[str, Any], out: str | None, *, complete: bool) -> str | None:
  """Writes `results` as JSON to `out`; without `out`, a `complete` run (the
  benchmark's default selection, its peer included) replaces
  benchmarks/results/BENCHMARK_KIND.json and any other run is not written."""
  if out is None:
    if not complete:
      print("\nnot saved: not the benchmark's default run (or its peer was missing); "
            "--out=FILE writes it")
      return None
    out = os.path.join(RESULTS_DIR, f"{benchmark}_{machine_kind(results['machine'])}.json")
  write_json(out, results)
  return out


def _vector_isa() -> list[str]:
  """The SIMD extensions that decide a CPU's matmul speed (AVX2, AVX-512, AMX),
  from /proc/cpuinfo; empty where it cannot be read."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
  except OSError:
    pass
  return []


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def matmul_peak(n: int = 1536, repeats: int = 3) -> float:
  """float32 matmul FLOP/s of this host through XLA (metrics.measure_matmul_peak)."""
  from mmjax.train import metrics
  return metrics.measure_matmul_peak(n, repeats)


def build_mmjax_step(config, task, devices=None):
  """(jitted train step, initial state, mesh, rules): the library's own step for
  `task` on `devices` (default: the first device)."""
  import jax

  from mmjax.train import loop, step as step_lib
  devices = devices or jax.devices()[:1]
  s = loop.build(config, devices, task=task)
  state = step_lib.create_state(task, s["tx"], config.seed, s["mesh"], s["rules"],
                                s["shardings"])
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(task, s["tx"], s["mask"], s["schedule"]),
      s["shardings"], s["mesh"], task.batch_spec(config.batch_size))
  return train_step, state, s["mesh"], s["rules"]


def time_against_peer(name: str, train_step, state, task, host_batch: dict, mesh, rules,
                      peer_step, *, repeats: int, steps: int, warmup: int) -> dict:
  """mmjax's step and the peer's (None: mmjax alone), alternating, with a matmul
  peak probe per repeat. Returns mmjax's loss at step 0 and after the timed
  steps (which must be finite), the seconds per step of each, and the peaks."""
  import jax
  import numpy as np

  from mmjax import parallel
  batch = jax.device_put(host_batch, {k: parallel.batch_sharding(mesh, x.ndim)
                                      for k, x in host_batch.items()})
  holder = {"state": state}
  with parallel.activate(mesh, rules):
    loss_0 = float(jax.jit(lambda p, b: task.loss(p, b, None)[0])(state.params, batch))

    def mm_step():
      holder["state"], metrics = train_step(holder["state"], batch)
      return metrics["train/loss"]

    peaks: list[float] = []
    fns = {"mmjax": mm_step}
    if peer_step is not None:
      fns["peer"] = peer_step
    times = alternate(fns, repeats=repeats, steps_per_repeat=steps, warmup=warmup,
                      between=lambda: peaks.append(matmul_peak()))
    final_loss = float(mm_step())
  if not np.isfinite(final_loss):
    raise FloatingPointError(f"[{name}] mmjax's loss is {final_loss} after the timed steps")
  return {"loss_0": loss_0, "final_loss": final_loss, "times": times, "peaks": peaks}


def alternate(steps: dict[str, Callable[[], Any]], *, repeats: int, steps_per_repeat: int,
              warmup: int = 2, between: Callable[[], Any] | None = None) -> dict[str, list[float]]:
  """Seconds per step of each entry, timed in turn, `repeats` times.

  Each callable runs one step and returns something to wait on (a JAX array,
  a torch tensor, or None for synchronous code). Running them alternately
  within one process exposes them to the same load, so their ratio survives a
  busy machine. `between` (e.g. a matmul peak probe) runs once per repeat.
  """
  for fn in steps.values():
    for _ in range(warmup):
      _wait(fn())
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(repeats):
    if between is not None:
      between()
    for name, fn in steps.items():
      start = time.perf_counter()
      out = None
      for _ in range(steps_per_repeat):
        out = fn()
      _wait(out)
      times[name].append((time.perf_counter() - start) / steps_per_repeat)
  return times


def _wait(x) -> None:
  if x is None:
    return
  if hasattr(x, "block_until_ready"):
    x.block_until_ready()
    return
  import jax
  jax.block_until_ready(x)


def median(xs: list[float]) -> float:
  return statistics.median(xs)


def result_row(name: str, batch: int, flops_per_example: float, mmjax_s: list[float],
               peer_s: list[float] | None, peaks: list[float], peer: str,
               note: str = "", extra: dict | None = None) -> dict[str, Any]:
  """One configuration's numbers: examples/s, ratio, achieved FLOP/s and its
  fraction of the matmul peak (medians over the repeats)."""
  mm = batch / median(mmjax_s)
  peer_rate = batch / median(peer_s) if peer_s else None
  peak = median(peaks)
  achieved = mm * flops_per_example
  row = {
      "name": name, "batch": batch, "peer": peer,
      "mmjax_examples_per_sec": round(mm, 3),
      "peer_examples_per_sec": None if peer_rate is None else round(peer_rate, 3),
      "ratio": None if peer_rate is None else round(mm / peer_rate, 3),
      "flops_per_example": flops_per_example,
      "achieved_flops_per_sec": round(achieved),
      "matmul_peak_flops_per_sec": round(peak),
      "fraction_of_peak": round(achieved / peak, 3),
      "mmjax_step_s": [round(t, 4) for t in mmjax_s],
      "peer_step_s": None if peer_s is None else [round(t, 4) for t in peer_s],
      "matmul_peak_samples": [round(p) for p in peaks],
  }
  if note:
    row["note"] = note
  row.update(extra or {})
  return row


def print_table(title: str, rows: list[dict[str, Any]], peer: str) -> None:
  print(f"\n{title}")
  head = (f"{'config':<10}{'batch':>6}{'mmjax ex/s':>12}{peer + ' ex/s':>18}{'ratio':>8}"
          f"{'GFLOP/s':>10}{'peak GFLOP/s':>14}{'of peak':>9}")
  print(head)
  print("-" * len(head))
  for r in rows:
    peer_rate = "skipped" if r["peer_examples_per_sec"] is None else f"{r['peer_examples_per_sec']:.2f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"{r['name']:<10}{r['batch']:>6}{r['mmjax_examples_per_sec']:>12.2f}{peer_rate:>18}"
          f"{ratio:>8}{r['achieved_flops_per_sec'] / 1e9:>10.1f}"
          f"{r['matmul_peak_flops_per_sec'] / 1e9:>14.1f}{r['fraction_of_peak']:>9.0%}")
    if r.get("note"):
      print(f"{'':<10}note: {r['note']}")
    if r.get("loss_difference_at_step_0") is not None:
      print(f"{'':<10}step-0 loss: mmjax {r['mmjax_loss_at_step_0']:.6f}, {peer} "
            f"{r['peer_loss_at_step_0']:.6f} (difference {r['loss_difference_at_step_0']:.2e})")


OUT_HELP = ("write the results as JSON here (default: a run of the default selection "
            "replaces benchmarks/results/BENCHMARK_MACHINE-KIND.json)")


def write_json(path: str | None, results: dict[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {path}")


def shape_args(argv, *, benchmark: str, shapes: dict, default: str) -> tuple[list[str], Any]:
  """The command line of a benchmark over named shapes (attention, matmul):
  --shapes, --repeats, --warmup, --out. Checks the names and configures the
  host; returns (the chosen names, the parsed args)."""
  parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{benchmark}")
  parser.add_argument("--shapes", default=default, help=f"comma-separated: {list(shapes)}")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None, help=OUT_HELP)
  args = parser.parse_args(argv)
  args.complete = is_default_run(parser, args)
  names = [n for n in args.shapes.split(",") if n]
  unknown = sorted(set(names) - set(shapes))
  if unknown:
    raise SystemExit(f"unknown shapes {unknown}; choose from {list(shapes)}")
  if "jax" not in sys.modules:
    configure_host()
  return names, args


def step_main(argv, *, benchmark: str, configs: dict, run_config: Callable, options: Callable,
              title: str, peer: str) -> dict:
  """The command line of a step benchmark (clip_step, llava_step): each chosen
  configuration through `run_config`, then the table and the JSON."""
  parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{benchmark}")
  parser.add_argument("--configs", default="small,tiny", help=f"comma-separated: {list(configs)}")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--scan", action="store_true", help="scan the layers (default: unrolled)")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--no_peer", action="store_true", help="time mmjax alone")
  parser.add_argument("--out", default=None, help=OUT_HELP)
  args = parser.parse_args(argv)
  if "jax" not in sys.modules:
    configure_host()
  opts = options(scan=args.scan, remat=args.remat)
  names = [n for n in args.configs.split(",") if n]
  unknown = sorted(set(names) - set(configs))
  if unknown:
    raise SystemExit(f"unknown configs {unknown}; choose from {list(configs)}")
  rows = [run_config(n, opts, args.repeats, args.steps, args.warmup, peer=not args.no_peer)
          for n in names]
  results = {"benchmark": benchmark, "machine": machine(), "repeats": args.repeats,
             "steps_per_repeat": args.steps, "configs": {r["name"]: r for r in rows}}
  print_table(title, rows, peer)
  print(f"load average (1, 5, 15 min): {results['machine']['load_avg_1_5_15']}")
  complete = is_default_run(parser, args) and all(r["ratio"] is not None for r in rows)
  save(benchmark, results, args.out, complete=complete)
  return results
