"""How far to trust the plan's roofline: its prediction for this CPU against
the measured step.

  python -m benchmarks.roofline [--configs=tiny,small] [--repeats=5] [--out=FILE.json]

For each CLIP configuration of `benchmarks.clip_step` (float32, one device)
the step is compiled for this CPU and read exactly as `python -m mmjax.plan`
reads a TPU program (mmjax.roofline): matmul FLOPs from its jaxpr, HBM traffic
and collectives from its HLO, loops by their trip counts. The chip is this
host, with two measured peaks: the float32 matmul FLOP/s (the compute bound)
and the bandwidth of a large array copy (the memory bound). Then the step is
timed. measured / predicted is how much slower than its roofline the step
runs on this machine: 1.0 would mean the program runs at the bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks import common


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
  """This host's memory bandwidth (bytes/s): the best of `repeats` timed
  copies of a float32 array (read once, written once)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((mib << 18,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  copy(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    copy(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * x.nbytes / best


def run_config(name: str, repeats: int, steps: int, warmup: int) -> dict:
  import jax

  from benchmarks import clip_step
  from mmjax import parallel, plan, roofline
  c = clip_step.CONFIGS[name]
  config = clip_step.mmjax_config(c, clip_step.Options())
  train_step, state, task, mesh, rules = clip_step.build_mmjax_step(config)
  batch = clip_step.device_batch(c, mesh)
  with parallel.activate(mesh, rules):
    traced = train_step.trace(state, batch)
    program = roofline.parse(traced.lower().compile().as_text())
  flops = plan.jaxpr_flops(traced.jaxpr.jaxpr)
  model_flops = task.flops_per_example() * c["batch"]

  holder = {"state": state}
  times, peaks, bandwidths = [], [], []
  with parallel.activate(mesh, rules):
    for _ in range(warmup):
      holder["state"], m = train_step(holder["state"], batch)
    jax.block_until_ready(m)
    for _ in range(repeats):
      peaks.append(common.matmul_peak())
      bandwidths.append(copy_bandwidth())
      t = time.perf_counter()
      for _ in range(steps):
        holder["state"], m = train_step(holder["state"], batch)
      jax.block_until_ready(m)
      times.append((time.perf_counter() - t) / steps)
  chip = roofline.Chip("cpu", None, statistics.median(peaks), hbm_bw=statistics.median(bandwidths))
  predicted = roofline.predict(flops, model_flops, roofline.analyse(program, chip), chip)
  measured = statistics.median(times)
  return {"config": name, "batch": c["batch"], "matmul_peak_flops": chip.peak_flops,
          "copy_bandwidth": chip.hbm_bw, "step_flops": flops, "model_flops": model_flops,
          "hbm_bytes": predicted["hbm_bytes"], "predicted": predicted["seconds"],
          "predicted_step_s": predicted["step_s"], "bound": predicted["bound"],
          "measured_step_s": measured, "measured_over_predicted": measured / predicted["step_s"],
          "predicted_mfu": predicted["mfu"],
          "measured_mfu": model_flops / (measured * chip.peak_flops)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny,small")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=None, help=common.OUT_HELP)
  a = p.parse_args(argv)
  if "jax" not in sys.modules:
    common.configure_host()
  rows = [run_config(n, a.repeats, a.steps, a.warmup) for n in a.configs.split(",")]
  print("CLIP train step on this CPU: the roofline's prediction against the measured step")
  print(f"  {'config':8s} {'compute':>9s} {'memory':>9s} {'bound':>8s} {'predicted':>10s} "
        f"{'measured':>9s} {'ratio':>6s} {'MFU pred':>8s} {'MFU meas':>8s}")
  for r in rows:
    ms = lambda s: f"{1e3 * s:7.1f}ms"  # noqa: E731
    print(f"  {r['config']:8s} {ms(r['predicted']['compute']):>9s} {ms(r['predicted']['hbm']):>9s} "
          f"{r['bound']:>8s} {ms(r['predicted_step_s']):>10s} {ms(r['measured_step_s']):>9s} "
          f"{r['measured_over_predicted']:6.2f} {100 * r['predicted_mfu']:7.1f}% "
          f"{100 * r['measured_mfu']:7.1f}%")
  print(f"  (this host: {rows[0]['matmul_peak_flops'] / 1e9:.0f} GFLOP/s float32 matmul, "
        f"{rows[0]['copy_bandwidth'] / 1e9:.1f} GB/s copy)")
  common.save("roofline", {"benchmark": "roofline", "machine": common.machine(), "rows": rows},
              a.out, complete=common.is_default_run(p, a))
  return rows


if __name__ == "__main__":
  main()
