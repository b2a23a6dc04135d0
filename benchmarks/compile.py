"""Compile time and peak host memory of the CLIP ViT-L/14 train step.

  python -m benchmarks.compile [--variant=L/14] [--text=L] [--no_scan] [--out=FILE.json]

The library's step (`mmjax.train.step`, AdamW, donated state) for open_clip's
ViT-L/14 sizes (vision 24 x 1024, text 12 x 768, embed 768, 224 px, context 77),
lowered and compiled ahead of time from abstract shapes: nothing is allocated
but what compiling needs. Scanned layers by default (compile time then barely
grows with depth). The resident set size is sampled every 20 ms while tracing
and compiling; its peak is reported with the baseline before.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from benchmarks import common


class RSSSampler:
  """Peak resident set size (bytes) of this process, sampled on a thread."""

  def __init__(self, interval_s: float = 0.02):
    self.interval_s, self.peak, self._stop = interval_s, rss_bytes(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      self._stop.wait(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    pages = int(f.read().split()[1])
  import resource
  return pages * resource.getpagesize()


def compile_clip_step(variant: str, text: str, embed_dim: int, batch: int, scan: bool,
                      remat: str, image_size: int = 224) -> dict:
  """Times tracing + lowering and compiling of the CLIP train step; returns the numbers."""
  import jax

  from benchmarks import clip_step
  from mmjax import parallel
  from mmjax.train import loop, step as step_lib, tasks
  c = dict(vision=variant, image_size=image_size, text=text, embed_dim=embed_dim, context_length=77,
           vocab_size=49408, batch=batch)
  config = clip_step.mmjax_config(c, clip_step.Options(scan=scan, remat=remat))
  task = tasks.CLIPTask(config, with_data=False)
  s = loop.build(config, jax.devices()[:1], task=task)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(task, s["tx"], s["mask"], s["schedule"]),
      s["shardings"], s["mesh"], task.batch_spec(batch))
  state = loop.restore_target(s["abstract"], s["shardings"])
  params = sum(x.size for x in jax.tree.leaves(s["abstract"].params))
  base = rss_bytes()
  with RSSSampler() as rss, parallel.activate(s["mesh"], s["rules"]):
    start = time.perf_counter()
    lowered = step.lower(state, task.batch_spec(batch))
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
  del compiled
  return {"model": f"CLIP ViT-{variant} + text {text}", "config": c, "scan": scan, "remat": remat,
          "params": int(params), "trace_and_lower_s": round(lower_s, 2),
          "compile_s": round(compile_s, 2), "total_s": round(lower_s + compile_s, 2),
          "rss_before_mib": round(base / 2**20), "peak_rss_mib": round(rss.peak / 2**20),
          "peak_rss_growth_mib": round((rss.peak - base) / 2**20)}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compile")
  parser.add_argument("--variant", default="L/14")
  parser.add_argument("--text", default="L")
  parser.add_argument("--embed_dim", type=int, default=768)
  parser.add_argument("--batch", type=int, default=8, help="global batch of the compiled step")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--no_scan", action="store_true", help="unrolled layers")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--out", default=None, help=common.OUT_HELP)
  args = parser.parse_args(argv)
  if "jax" not in sys.modules:
    common.configure_host()
  r = compile_clip_step(args.variant, args.text, args.embed_dim, args.batch, not args.no_scan,
                        args.remat, args.image_size)
  results = {"benchmark": "compile", "machine": common.machine(), **r}
  print(f"\n{r['model']} train step ({r['params'] / 1e6:.0f}M params, batch {args.batch}, "
        f"{'scanned' if r['scan'] else 'unrolled'} layers, remat {r['remat']})")
  print(f"  trace + lower {r['trace_and_lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
        f"total {r['total_s']:.1f} s")
  print(f"  host memory: {r['rss_before_mib']} MiB before, peak {r['peak_rss_mib']} MiB "
        f"(+{r['peak_rss_growth_mib']} MiB)")
  print(f"load average (1, 5, 15 min): {results['machine']['load_avg_1_5_15']}")
  common.save("compile", results, args.out, complete=common.is_default_run(parser, args))
  return results


if __name__ == "__main__":
  main()
