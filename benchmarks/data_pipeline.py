"""Data pipeline throughput next to what a tiny CLIP train step consumes.

  python -m benchmarks.data_pipeline [--data_dir=DIR] [--batch_size=256] [--out=FILE.json]

Without --data_dir, the datasets are prepared into a fresh temporary folder, so
the preparation time of shapes at its default sizes is measured too.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from benchmarks import common


def _pipeline_rate(cfg, batch_size: int, steps: int, warmup: int = 4) -> float:
  from mmjax import data
  it = data.train_iterator(cfg, batch_size=batch_size, seed=0, shard_index=0, shard_count=1)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  rate = steps * batch_size / (time.perf_counter() - start)
  it.close()
  return rate


def _eval_rate(cfg, batch_size: int) -> float:
  from mmjax import data
  batches = data.eval_iterator(cfg, batch_size=batch_size, shard_index=0, shard_count=1)
  start = time.perf_counter()
  n = sum(int(b["mask"].sum()) for b in batches)
  return n / (time.perf_counter() - start)


def _clip_step_rate(image_size: int, vocab_size: int, context_length: int, batch_size: int,
                    steps: int, batches=None) -> tuple[float, float, float | None]:
  """Images/s of a jitted adam step of a tiny CLIP on fixed arrays, the compile time,
  and, given an iterator of `batches`, images/s of the step fed by it."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from mmjax.models.clip import CLIP, CLIPConfig
  from mmjax.models.text import TextConfig
  from mmjax.models.vit import ViTConfig

  config = CLIPConfig(vision=ViTConfig(variant="tiny/8", image_size=image_size),
                      text=TextConfig(size="tiny", vocab_size=vocab_size,
                                      context_length=context_length),
                      embed_dim=32)
  model = CLIP(config)
  images = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(3, vocab_size, (batch_size, context_length)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images[:2], text[:2]))["params"]
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  def loss_fn(p, images, text):
    out = model.apply({"params": p}, images, text)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    labels = jnp.arange(logits.shape[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2

  @jax.jit
  def step(p, s, images, text):
    loss, grads = jax.value_and_grad(loss_fn)(p, images, text)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  start = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, images, text)
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, images, text)
  loss.block_until_ready()
  alone = steps * batch_size / (time.perf_counter() - start)
  fed = None
  if batches is not None:
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
      # Dispatch is asynchronous: the next batch is made while the step runs.
      batch = next(batches)
      params, opt_state, loss = step(params, opt_state, batch["image"], batch["text"])
    loss.block_until_ready()
    fed = steps * batch_size / (time.perf_counter() - start)
  return alone, compile_s, fed


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.data_pipeline")
  parser.add_argument("--data_dir", default=None,
                      help="reuse prepared data here; default: a fresh temporary folder")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
  parser.add_argument("--num_train", type=int, default=20000, help="shapes train size")
  parser.add_argument("--skip_model", action="store_true", help="no CLIP step timing")
  parser.add_argument("--out", default=None, help=common.OUT_HELP)
  args = parser.parse_args(argv)

  from mmjax import data
  from mmjax.data import builders, tokenizer

  tmp = None
  data_dir = args.data_dir
  if data_dir is None:
    tmp = data_dir = tempfile.mkdtemp(prefix="mmjax_bench_")
  results = {"benchmark": "data_pipeline", "machine": common.machine(),
             "batch_size": args.batch_size, "pipelines": [], "models": []}
  try:
    shapes_cfg = data.default_data_config("shapes")
    shapes_cfg.data_dir = data_dir
    shapes_cfg.builder_kwargs.num_train = args.num_train
    digits_cfg = data.default_data_config("digits")
    digits_cfg.data_dir = data_dir
    for name, cfg in (("shapes", shapes_cfg), ("digits", digits_cfg)):
      start = time.perf_counter()
      builder = data.prepare(name, data_dir, image_size=cfg.image_size, **cfg.builder_kwargs)
      results[f"prepare_{name}_s"] = round(time.perf_counter() - start, 2)
      results[f"{name}_train_examples"] = builder.info.splits["train"].num_examples

    for name, cfg in (("shapes", shapes_cfg), ("digits", digits_cfg)):
      for threads, workers, prefetch in ((0, 0, 0), (0, 0, 2), (2, 0, 2), (0, 2, 2)):
        run = cfg.copy_and_resolve_references()
        run.read_threads, run.num_workers, run.prefetch = threads, workers, prefetch
        rate = _pipeline_rate(run, args.batch_size, args.steps)
        results["pipelines"].append({"dataset": name, "kind": "train",
                                     "image_size": cfg.image_size, "read_threads": threads,
                                     "num_workers": workers, "prefetch": prefetch,
                                     "images_per_s": round(rate, 1)})
      rate = _eval_rate(cfg, args.batch_size)
      results["pipelines"].append({"dataset": name, "kind": "eval", "image_size": cfg.image_size,
                                   "read_threads": cfg.read_threads, "num_workers": 0,
                                   "prefetch": 0, "images_per_s": round(rate, 1)})

    if not args.skip_model:
      for name, cfg in (("shapes", shapes_cfg), ("digits", digits_cfg)):
        tok = data.dataset_tokenizer(cfg)
        it = data.train_iterator(cfg, batch_size=args.batch_size, seed=0, shard_index=0,
                                 shard_count=1)
        rate, compile_s, fed = _clip_step_rate(cfg.image_size, tok.vocab_size,
                                               cfg.context_length, args.batch_size, args.steps,
                                               batches=it)
        it.close()
        results["models"].append({"model": "CLIP tiny/8 + text tiny, adam", "dataset": name,
                                  "image_size": cfg.image_size, "images_per_s": round(rate, 1),
                                  "fed_by_pipeline_images_per_s": round(fed, 1),
                                  "compile_s": round(compile_s, 2)})
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  del builders, tokenizer

  print(f"\nprepare shapes ({results['shapes_train_examples']} train + val + test, "
        f"{shapes_cfg.image_size} px): {results['prepare_shapes_s']} s; "
        f"digits: {results['prepare_digits_s']} s")
  print(f"\n{'what':<34}{'px':>5}{'threads':>9}{'workers':>9}{'prefetch':>10}{'img/s':>10}")
  for r in results["pipelines"]:
    print(f"{r['dataset'] + ' ' + r['kind'] + ' pipeline':<34}{r['image_size']:>5}"
          f"{r['read_threads']:>9}{r['num_workers']:>9}{r['prefetch']:>10}"
          f"{r['images_per_s']:>10.0f}")
  for r in results["models"]:
    print(f"{'tiny CLIP step, fixed batch (' + r['dataset'] + ')':<34}{r['image_size']:>5}"
          f"{'':>28}{r['images_per_s']:>10.0f}")
    print(f"{'tiny CLIP step, fed (' + r['dataset'] + ')':<34}{r['image_size']:>5}"
          f"{'':>28}{r['fed_by_pipeline_images_per_s']:>10.0f}")
  common.save("data_pipeline", results, args.out, complete=common.is_default_run(parser, args))
  return results


if __name__ == "__main__":
  main()
