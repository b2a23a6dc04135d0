"""ViT data efficiency: 10% of the train labels, five ways to train the same ViT.

  python -m research.data_efficiency --out=runs/data_efficiency [--processes=4]

On a fixed random `--label_fraction` of the train labels (the same examples for
every run), the same ViT and the same fine-tuning budget (steps, batch, lr,
label smoothing, crops):
  scratch  from random weights
  hybrid   a convolutional stem instead of the linear patch embedding
  distill  DeiT hard-label distillation from a small ConvNet teacher trained on
           the same labelled subset (one teacher per seed)
  distill_all  the same, and the student also sees the other train images,
           labelled by the teacher only (as the MAE pretraining sees them)
  mae      fine-tuned from an MAE encoder pretrained on every train image,
           without labels (one pretraining run, seed 0)
Each for every seed. Writes OUT/data_efficiency.md (a table of test top-1,
mean +- sample std over seeds), OUT/report.png (the same as a bar chart) and
OUT/results.json; each run's workdir is OUT/runs/NAME, and a finished run
(its result.json) is not trained again, so an interrupted study resumes.
`--processes=N` > 1 trains the MAE pretraining and the seeds in parallel
processes (a seed's MAE fine-tuning waits for the pretraining).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import convnet_digits, mae_digits, vit_digits
from mmjax.train import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "output folder", required=True)
flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds")
flags.DEFINE_string("methods", "scratch,hybrid,distill,distill_all,mae", "which methods")
flags.DEFINE_float("label_fraction", 0.1, "fraction of the train labels")
flags.DEFINE_integer("steps", 1200, "fine-tuning steps (every method)")
flags.DEFINE_integer("batch", 32, "fine-tuning batch size")
flags.DEFINE_float("lr", 1e-3, "fine-tuning learning rate")
flags.DEFINE_string("variant", "nano/4", "the ViT")
flags.DEFINE_integer("image_size", 16, "digits are 8 x 8: 16 px lose nothing")
flags.DEFINE_integer("teacher_steps", 600, "ConvNet teacher steps")
flags.DEFINE_integer("teacher_width", 16, "ConvNet teacher width")
flags.DEFINE_integer("mae_steps", 2400, "MAE pretraining steps (all train images)")
flags.DEFINE_integer("mae_batch", 64, "MAE pretraining batch size")
flags.DEFINE_integer("processes", 1, "parallel processes: the MAE pretraining and one per seed")
flags.DEFINE_bool("summary_only", False,
                  "only write the table and plot from the runs finished so far")
flags.DEFINE_enum("role", "all", ["all", "mae_pretrain", "seed"],
                  "internal: what a child process of --processes trains")

METHODS = ("scratch", "hybrid", "distill", "distill_all", "mae")
DISTILL = {"distill", "distill_all"}  # the methods that need a teacher


def _quiet(c):
  """Evaluate and checkpoint once, at the end; synchronous saves."""
  c.eval_every = c.checkpoint_every = c.total_steps
  c.log_every = max(1, c.total_steps // 6)
  c.async_checkpoints = False
  return c


def teacher_config(seed: int):
  c = convnet_digits.get_config(f"labels={FLAGS.label_fraction},width={FLAGS.teacher_width},"
                                f"steps={FLAGS.teacher_steps},batch={FLAGS.batch},crop=true,"
                                f"image_size={FLAGS.image_size}")
  c.seed = seed
  return _quiet(c)


def mae_config():
  size, patch = FLAGS.variant.split("/")
  return _quiet(mae_digits.get_config(f"variant={size},patch={patch},steps={FLAGS.mae_steps},"
                                      f"batch={FLAGS.mae_batch},decoder_depth=1,"
                                      f"image_size={FLAGS.image_size}"))


def vit_config(method: str, seed: int, out: str):
  size, patch = FLAGS.variant.split("/")
  arg = (f"labels={FLAGS.label_fraction},variant={size},patch={patch},steps={FLAGS.steps},"
         f"batch={FLAGS.batch},lr={FLAGS.lr},crop=true,image_size={FLAGS.image_size}")
  if method == "hybrid":
    arg += ",stem=conv"
  elif method in DISTILL:
    arg += f",teacher={run_dir(out, f'teacher_s{seed}')},unlabelled={method == 'distill_all'}"
  elif method == "mae":
    arg += f",mae={run_dir(out, 'mae_pretrain')}"
  c = vit_digits.get_config(arg)
  c.seed = seed
  c.optim.warmup_steps = min(c.optim.warmup_steps, FLAGS.steps // 10)
  return _quiet(c)


def run_dir(out: str, name: str) -> str:
  return os.path.join(out, "runs", name)


def train_once(config, out: str, name: str) -> dict:
  """Trains `name` unless its result.json exists; returns the result."""
  workdir = run_dir(out, name)
  result_path = os.path.join(workdir, "result.json")
  os.makedirs(workdir, exist_ok=True)
  try:  # another process of this study may be training it: then wait for its result
    os.close(os.open(os.path.join(workdir, "claimed"), os.O_CREAT | os.O_EXCL))
  except FileExistsError:
    _wait_for(result_path)
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  t0 = time.perf_counter()
  logged = loop.train(config, workdir)
  result = {k: v for k, v in logged.items() if k.startswith("eval/") or k == "step"}
  result["wall_sec"] = time.perf_counter() - t0
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2)
  logging.info("%s: %s", name, result)
  return result


def summarise(results: dict[str, list[float]], meta: dict) -> str:
  lines = [f"Test top-1 on digits with {meta['label_fraction']:.0%} of the train labels "
           f"({meta['variant']}, {meta['steps']} steps of batch {meta['batch']}, "
           f"seeds {meta['seeds']}; MAE pretrained for {meta['mae_steps']} steps):", "",
           "| method | top-1 (mean +- std) | per seed |", "|---|---|---|"]
  for method, values in results.items():
    v = np.asarray(values)
    lines.append(f"| {method} | {v.mean():.3f} +- {_std(v):.3f} | "
                 + ", ".join(f"{x:.3f}" for x in v) + " |")
  return "\n".join(lines) + "\n"


def _std(values) -> float:
  """The sample standard deviation over seeds (0 for one seed)."""
  v = np.asarray(values, np.float64)
  return float(v.std(ddof=1)) if v.size > 1 else 0.0


def plot(results: dict[str, list[float]], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results)
  means = [np.mean(results[n]) for n in names]
  stds = [_std(results[n]) for n in names]
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = ["tab:gray", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
  ax.bar(names, means, yerr=stds, capsize=6,
         color=[colors[i % len(colors)] for i in range(len(names))])
  ax.tick_params(axis="x", labelrotation=20)
  for i, n in enumerate(names):
    ax.scatter([i] * len(results[n]), results[n], color="black", s=12, zorder=3)
  low = min(min(v) for v in results.values())
  ax.set_ylim(max(0.0, low - 0.1), 1.0)
  ax.set_ylabel("test top-1"), ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def train_seed(out: str, seed: int, methods: list[str]) -> None:
  """Every run of one seed: the teacher first, MAE's fine-tuning last."""
  if DISTILL & set(methods):
    train_once(teacher_config(seed), out, f"teacher_s{seed}")
  for method in sorted(methods, key=lambda m: m == "mae"):
    if method == "mae":
      _wait_for(os.path.join(run_dir(out, "mae_pretrain"), "result.json"))
    train_once(vit_config(method, seed, out), out, f"{method}_s{seed}")


def _wait_for(path: str) -> None:
  while not os.path.exists(path):
    time.sleep(10)


def _run_children(out: str, seeds: list[int], methods: list[str]) -> None:
  """The MAE pretraining and each seed in their own process; fails if any fails."""
  passed = [a for a in sys.argv[1:] if not a.startswith(("--role", "--seeds", "--processes"))]
  base = [sys.executable, "-m", "research.data_efficiency", *passed, "--processes=1"]
  jobs = []
  if "mae" in methods:
    jobs.append(("mae_pretrain", base + ["--role=mae_pretrain"]))
  jobs += [(f"seed {s}", base + ["--role=seed", f"--seeds={s}"]) for s in seeds]
  procs = []
  for name, cmd in jobs:
    log = open(os.path.join(out, f"log_{name.replace(' ', '_')}.txt"), "w")
    procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
  failed = []
  for name, proc, log in procs:
    if proc.wait():
      failed.append(name)
    log.close()
  if failed:
    raise RuntimeError(f"{failed} failed; see {out}/log_*.txt")


def main(argv):
  del argv
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  # The same train step recompiles for every seed and method; cache it on disk.
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  seeds = [int(s) for s in FLAGS.seeds.split(",")]
  methods = [m for m in FLAGS.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown --methods {unknown}; known: {METHODS}")
  if FLAGS.role == "mae_pretrain":
    train_once(mae_config(), out, "mae_pretrain")
    return
  if FLAGS.role == "seed":
    for seed in seeds:
      train_seed(out, seed, methods)
    return
  if FLAGS.summary_only:
    pass
  elif FLAGS.processes > 1:
    _run_children(out, seeds, methods)
  else:
    if "mae" in methods:
      train_once(mae_config(), out, "mae_pretrain")
    for seed in seeds:
      train_seed(out, seed, methods)
  names = [(m, m) for m in methods]
  if DISTILL & set(methods):
    names.append(("teacher (ConvNet)", "teacher"))
  results: dict[str, list[float]] = {}
  missing = []
  for label, prefix in names:
    for seed in seeds:
      path = os.path.join(run_dir(out, f"{prefix}_s{seed}"), "result.json")
      if os.path.exists(path):
        with open(path) as f:
          results.setdefault(label, []).append(json.load(f)["eval/top1"])
      else:
        missing.append(f"{prefix}_s{seed}")
  meta = {"label_fraction": FLAGS.label_fraction, "variant": FLAGS.variant,
          "steps": FLAGS.steps, "batch": FLAGS.batch, "seeds": seeds,
          "mae_steps": FLAGS.mae_steps}
  table = summarise(results, meta)
  if missing:
    table += f"\nNot finished: {', '.join(missing)}.\n"
  with open(os.path.join(out, "data_efficiency.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"meta": meta, "top1": results}, f, indent=2)
  plot(results, os.path.join(out, "report.png"),
       f"ViT on digits, {FLAGS.label_fraction:.0%} labels: test top-1 over {len(seeds)} seeds")
  print(table)


if __name__ == "__main__":
  app.run(main)
