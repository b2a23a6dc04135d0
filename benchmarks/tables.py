"""The docs' benchmark tables, made from benchmarks/results/*.json.

  python -m benchmarks.tables            # rewrite the tables in docs/performance.md
  python -m benchmarks.tables --check    # exit 1 if they differ from the results files

Each benchmark's table sits in docs/performance.md between the lines
`<!-- results:NAME -->` and `<!-- /results:NAME -->`, one row per
configuration (or shape) and machine kind, each with its machine and date.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Any, Callable

from benchmarks import common

DOCS = os.path.join(os.path.dirname(common.RESULTS_DIR), os.pardir, "docs", "performance.md")


def load(results_dir: str = common.RESULTS_DIR) -> dict[str, list[dict[str, Any]]]:
  """benchmark name -> its results files' contents, ordered by machine kind."""
  out: dict[str, list[dict[str, Any]]] = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    r["_kind"] = common.machine_kind(r["machine"])
    out.setdefault(r["benchmark"], []).append(r)
  return out


def _machine(r: dict) -> str:
  return f"{r['_kind']}, {r['machine'].get('date', '?')}"


def _table(head: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _x(v: float | None) -> str:
  return "-" if v is None else f"{v:.2f}x"


def _step(results: list[dict]) -> str:
  peer = results[0]["configs"][next(iter(results[0]["configs"]))]["peer"]
  rows = []
  for r in results:
    for c in r["configs"].values():
      diff = c.get("loss_difference_at_step_0")
      rows.append([_machine(r), c["name"], c["batch"], f"{c['mmjax_examples_per_sec']:.3g}",
                   "-" if c["peer_examples_per_sec"] is None else f"{c['peer_examples_per_sec']:.3g}",
                   f"**{_x(c['ratio'])}**", f"{c['fraction_of_peak']:.0%}",
                   "-" if diff is None else f"{diff:.1e}"])
  return _table(["machine, date", "config", "batch", "mmjax ex/s", f"{peer} ex/s",
                 f"mmjax / {peer}", "of matmul peak", "step-0 loss difference"], rows)


def _attention(results: list[dict]) -> str:
  rows = []
  for r in results:
    for s in r["shapes"].values():
      for part in ("fwd", "fwd+bwd"):
        ms = s["median_ms"]
        torch_ms = ms.get(f"torch {part}")
        rows.append([_machine(r), s["name"], part, f"{ms[f'ours {part}']:.1f}",
                     f"{ms[f'xla {part}']:.1f}", "-" if torch_ms is None else f"{torch_ms:.1f}",
                     _x(s[f"xla_over_ours_{part}"]), _x(s.get(f"torch_over_ours_{part}"))])
  return _table(["machine, date", "shape", "pass", "mmjax ms", "jax.nn (XLA) ms", "torch ms",
                 "XLA / mmjax", "torch / mmjax"], rows)


def _matmul(results: list[dict]) -> str:
  rows = []
  for r in results:
    for s in r["shapes"].values():
      for p in [*s["products"], {"product": "**all, FLOP-weighted**", **s["total"]}]:
        torch_rate = p.get("torch_gflops_per_sec")
        rows.append([_machine(r), s["name"], p["product"], f"{p['flops'] / 1e9:.2f}",
                     f"{p['xla_gflops_per_sec']:.0f}",
                     "-" if torch_rate is None else f"{torch_rate:.0f}",
                     _x(p.get("torch_over_xla"))])
  return _table(["machine, date", "shape", "product", "GFLOP", "XLA GFLOP/s", "torch GFLOP/s",
                 "torch time / XLA time"], rows)


def _compile(results: list[dict]) -> str:
  rows = [[_machine(r), r["model"], f"{r['params'] / 1e6:.0f}M", r["config"]["batch"],
           "scanned" if r["scan"] else "unrolled", r["trace_and_lower_s"], r["compile_s"],
           r["peak_rss_growth_mib"]] for r in results]
  return _table(["machine, date", "model", "params", "batch", "layers", "trace + lower s",
                 "compile s", "host memory growth MiB"], rows)


def _roofline(results: list[dict]) -> str:
  rows = []
  for r in results:
    for c in r["rows"]:
      rows.append([_machine(r), c["config"], c["bound"], f"{1e3 * c['predicted_step_s']:.1f}",
                   f"{1e3 * c['measured_step_s']:.1f}", f"{c['measured_over_predicted']:.2f}",
                   f"{c['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, "
                   f"{c['copy_bandwidth'] / 1e9:.1f} GB/s"])
  return _table(["machine, date", "config", "bound", "predicted ms", "measured ms",
                 "measured / predicted", "peaks used"], rows)


def _data_pipeline(results: list[dict]) -> str:
  rows = []
  for r in results:
    for p in r["pipelines"]:
      rows.append([_machine(r), f"{p['dataset']} {p['kind']} pipeline", p["image_size"],
                   p["read_threads"], p["num_workers"], p["prefetch"], f"{p['images_per_s']:.0f}"])
    for m in r["models"]:
      rows.append([_machine(r), f"tiny CLIP step, fixed batch ({m['dataset']})", m["image_size"],
                   "", "", "", f"{m['images_per_s']:.0f}"])
      rows.append([_machine(r), f"tiny CLIP step, fed by the pipeline ({m['dataset']})",
                   m["image_size"], "", "", "", f"{m['fed_by_pipeline_images_per_s']:.0f}"])
  return _table(["machine, date", "what", "px", "read threads", "workers", "prefetch",
                 "images/s"], rows)


def _gpu(results: list[dict]) -> str:
  rows = []
  for r in results:
    for name in ("clip", "llava"):
      if name in r:
        m = r[name]
        rows.append([_machine(r), m["model"], m["dtype"], m["batch"],
                     f"{m['examples_per_sec']:.1f}", f"{m['mfu']:.1%}"])
  return _table(["machine, date", "model", "dtype", "batch", "examples/s", "MFU"], rows)


RENDER: dict[str, Callable[[list[dict]], str]] = {
    "clip_step": _step, "llava_step": _step, "attention": _attention, "matmul": _matmul,
    "compile": _compile, "roofline": _roofline, "data_pipeline": _data_pipeline, "gpu": _gpu}


def render(text: str, results: dict[str, list[dict]]) -> str:
  """`text` with every `<!-- results:NAME -->` block replaced by NAME's table
  (or a line saying that no results file has it yet)."""
  def block(m: re.Match) -> str:
    name = m.group(1)
    if name not in RENDER:
      raise KeyError(f"docs: no table for benchmark {name!r}; known: {sorted(RENDER)}")
    body = (RENDER[name](results[name]) if name in results
            else f"(no results file for {name} yet: run `python -m benchmarks.{name}`)")
    return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"
  return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", block, text, flags=re.S)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.tables")
  parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
  parser.add_argument("--docs", default=os.path.normpath(DOCS))
  args = parser.parse_args(argv)
  with open(args.docs) as f:
    text = f.read()
  new = render(text, load())
  if args.check:
    if new != text:
      print(f"{args.docs}: the benchmark tables differ from benchmarks/results/; "
            "run `python -m benchmarks.tables`")
      return 1
    return 0
  if new != text:
    with open(args.docs, "w") as f:
      f.write(new)
    print(f"rewrote the tables of {args.docs}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
