"""GPU readiness: examples/s and MFU of the CLIP and LLaVA train steps on one GPU.

  python -m benchmarks.gpu [--smoke] [--out=FILE.json]     (benchmarks/gpu.sh runs it)

1. CLIP ViT-B/16 + the B text tower (open_clip's sizes), bfloat16, fused
   attention ("auto": cuDNN flash through jax.nn.dot_product_attention), scanned
   layers, remat "dots_no_batch", at the largest batch of a descending list
   whose compiled memory fits the device (XLA's memory analysis, before any
   run; a batch that still fails at run time falls to the next).
2. A LLaVA stage-2 step: CLIP ViT-L/14 at 336 px (frozen) + mlp2x_gelu + the
   ~1B Llama (LLM_SIZES["1B"]: 16 x 2048, GQA 32/8, vocab 128256), bfloat16.

MFU = examples/s x model FLOPs per example (the tasks' `flops_per_example`)
over the chip's dense bf16 peak (989 TFLOP/s for H100/H200, from
`mmjax.train.metrics.PEAK_FLOPS`; a CPU falls back to its measured float32
matmul peak). --smoke runs tiny models, so the script is checked on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common

CLIP_BATCHES = (1536, 1024, 768, 512, 256, 128)
SMOKE_CLIP_BATCHES = (64, 16)


def _fits(compiled, device) -> tuple[bool, float | None]:
  """(fits, GiB needed) from XLA's memory analysis; unknown limits count as fitting."""
  try:
    stats = compiled.memory_analysis()
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # some backends have no analysis
    return True, None
  if stats is None:
    return True, None
  need = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return (limit is None or need < 0.95 * limit), need / 2**30


def _time_steps(step, state, batch, steps: int):
  """Seconds per step over `steps` steps after one warm-up (the compiled call)."""
  state, m = step(state, batch)
  m["train/loss"].block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  loss = float(m["train/loss"])
  return (time.perf_counter() - start) / steps, loss, state


def _peak() -> tuple[float, str]:
  from mmjax.train import metrics
  return metrics.peak_flops()


def clip_run(smoke: bool, steps: int, attention: str) -> dict:
  import jax
  import numpy as np

  from benchmarks import clip_step
  from mmjax import parallel
  if smoke:
    c = dict(clip_step.CONFIGS["tiny"])
    batches = SMOKE_CLIP_BATCHES
  else:
    c = dict(vision="B/16", image_size=224, text="B", embed_dim=512, context_length=77,
             vocab_size=49408)
    batches = CLIP_BATCHES
  opts = clip_step.Options(scan=True, remat="dots_no_batch", dtype="bfloat16",
                           attention=attention)
  device = jax.devices()[0]
  tried = []
  for batch in batches:
    c["batch"] = batch
    config = clip_step.mmjax_config(c, opts)
    step, state, task, mesh, rules = clip_step.build_mmjax_step(config)
    data = clip_step.device_batch(c, mesh)
    with parallel.activate(mesh, rules):
      start = time.perf_counter()
      compiled = step.lower(state, data).compile()
      compile_s = time.perf_counter() - start
      fits, need_gib = _fits(compiled, device)
      tried.append({"batch": batch, "compile_s": round(compile_s, 1),
                    "memory_gib": None if need_gib is None else round(need_gib, 1), "fits": fits})
      print(f"  CLIP batch {batch}: compiled in {compile_s:.1f} s, needs "
            f"{'?' if need_gib is None else f'{need_gib:.1f}'} GiB: "
            f"{'fits' if fits else 'too big'}", flush=True)
      if not fits:
        continue
      try:
        sec, loss, _ = _time_steps(compiled, state, data, steps)
      except jax.errors.JaxRuntimeError as e:  # out of memory at run time after all
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        tried[-1]["fits"] = False
        print(f"  CLIP batch {batch}: out of memory at run time", flush=True)
        continue
    peak, source = _peak()
    flops = task.flops_per_example()
    rate = batch / sec
    return {"model": f"CLIP ViT-{c['vision']} + text {c['text']}", "dtype": opts.dtype,
            "attention": attention, "remat": opts.remat, "batch": batch,
            "examples_per_sec": round(rate, 1), "step_s": round(sec, 4),
            "flops_per_example": flops, "mfu": round(rate * flops / peak, 4),
            "peak_flops_per_sec": peak, "peak_source": source, "loss": loss,
            "batches_tried": tried, "finite": bool(np.isfinite(loss))}
  raise RuntimeError(f"no CLIP batch in {batches} fits on {device.device_kind}: {tried}")


def llava_run(smoke: bool, steps: int, attention: str) -> dict:
  import jax
  import numpy as np

  from benchmarks import llava_step
  from mmjax import parallel
  from mmjax.models.llm import LLM_SIZES
  if smoke:
    c = dict(llava_step.CONFIGS["tiny"])
  else:
    llm = {k: v for k, v in LLM_SIZES["1B"].items()}
    c = dict(vision=dict(variant="L/14"), image_size=336, llm=llm, max_len=512, batch=8)
  opts = llava_step.Options(scan=True, remat="dots_no_batch" if not smoke else "none",
                            dtype="bfloat16", attention=attention)
  config = llava_step.mmjax_config(c, opts)
  step, state, task, mesh, rules = llava_step.build_mmjax_step(config)
  image, tokens, labels = llava_step.make_batch(c)
  host = {"image": image, "tokens": tokens, "labels": labels}
  data = jax.device_put(host, {k: parallel.batch_sharding(mesh, x.ndim) for k, x in host.items()})
  with parallel.activate(mesh, rules):
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    sec, loss, _ = _time_steps(compiled, state, data, steps)
  peak, source = _peak()
  flops = task.flops_per_example()
  rate = c["batch"] / sec
  mc = task.model_config
  return {"model": f"LLaVA stage 2: ViT {mc.vision.variant} @ {mc.vision.image_size} px + "
                   f"LLM {mc.llm.depth} x {mc.llm.width}, vocab {mc.llm.vocab_size}",
          "dtype": opts.dtype, "attention": attention, "remat": opts.remat, "batch": c["batch"],
          "sequence_length": c["max_len"] - 1 + mc.num_image_tokens,
          "compile_s": round(compile_s, 1), "examples_per_sec": round(rate, 2),
          "step_s": round(sec, 4), "flops_per_example": flops,
          "mfu": round(rate * flops / peak, 4), "peak_flops_per_sec": peak,
          "peak_source": source, "loss": loss, "finite": bool(np.isfinite(loss))}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
  parser.add_argument("--smoke", action="store_true", help="tiny models: checks the script on CPU")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
  parser.add_argument("--only", default="clip,llava")
  parser.add_argument("--out", default=None, help=common.OUT_HELP)
  args = parser.parse_args(argv)
  if "jax" not in sys.modules and args.smoke:
    common.configure_host()
  import jax
  gpu = jax.default_backend() == "gpu"
  if not gpu and not args.smoke:
    raise SystemExit(f"no GPU (backend {jax.default_backend()!r}): run with --smoke on a CPU")
  from mmjax.models import attention as attention_lib
  attention = "auto"  # cuDNN flash for bfloat16 on a GPU (mmjax.models.attention)
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; attention: "
        f"{attention_lib.resolve(attention, 'bfloat16')}", flush=True)
  steps = 2 if args.smoke else args.steps
  results = {"benchmark": "gpu", "machine": common.machine(), "smoke": args.smoke}
  only = args.only.split(",")
  if "clip" in only:
    r = results["clip"] = clip_run(args.smoke, steps, attention)
    print(f"{r['model']}, {r['dtype']}, batch {r['batch']}: {r['examples_per_sec']:.1f} "
          f"examples/s, MFU {r['mfu']:.1%} of {r['peak_flops_per_sec'] / 1e12:.4g} TFLOP/s "
          f"({r['peak_source']})", flush=True)
  if "llava" in only:
    r = results["llava"] = llava_run(args.smoke, steps, attention)
    print(f"{r['model']}, {r['dtype']}, batch {r['batch']} x {r['sequence_length']} positions: "
          f"{r['examples_per_sec']:.2f} examples/s, MFU {r['mfu']:.1%} (compile "
          f"{r['compile_s']:.0f} s)", flush=True)
  for name in ("clip", "llava"):
    if name in results and not results[name]["finite"]:
      raise SystemExit(f"{name}: non-finite loss {results[name]['loss']}")
  common.save("gpu", results, args.out, complete=common.is_default_run(parser, args))
  return results


if __name__ == "__main__":
  main()
