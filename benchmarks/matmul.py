"""The matmuls of one transformer layer's train step, alone: XLA's (what a
jitted mmjax step runs) against torch's (what open_clip's step runs), timed in
alternation in one process, medians over the repeats.

  python -m benchmarks.matmul [--shapes=vit_s16] [--out=FILE.json]

Each dense layer of the step does three products: the forward x W, the input
gradient dy W^T and the weight gradient x^T dy; attention adds q k^T and p v
per head. The shapes are those of one layer of the CLIP benchmark's ViT-S/16
tower (`vit_s16`: batch 32 x 197 tokens, width 384, MLP 1536, 6 heads of 64);
`tiny` is for CI. Both sides take their operands in the same memory layout
(row-major, the transposes as views or in the dot's dimension numbers) and
return a fresh array, float32. `torch_over_xla` is torch's time over XLA's
(above 1: XLA is faster); the totals weight each product by its FLOPs.
"""

from __future__ import annotations

from typing import Any

from benchmarks import common

# name -> (tokens = batch x sequence, width, MLP width, batch x heads, sequence, head dim)
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "vit_s16": (32 * 197, 384, 1536, 32 * 6, 197, 64),
    "tiny": (2 * 17, 16, 64, 2 * 4, 17, 4),
}


def products(shape) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
  """name -> (einsum spec, lhs shape, rhs shape) of one layer's products."""
  m, d, f, bh, t, h = shape
  out: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
  for name, n_in, n_out in (("qkv", d, 3 * d), ("out", d, d), ("fc1", d, f), ("fc2", f, d)):
    out[f"{name} x W"] = ("mk,kn->mn", (m, n_in), (n_in, n_out))
    out[f"{name} dy W^T"] = ("mn,kn->mk", (m, n_out), (n_in, n_out))
    out[f"{name} x^T dy"] = ("mk,mn->kn", (m, n_in), (m, n_out))
  out["attn q k^T"] = ("bqh,bsh->bqs", (bh, t, h), (bh, t, h))
  out["attn p v"] = ("bqs,bsh->bqh", (bh, t, t), (bh, t, h))
  out["attn p^T dy"] = ("bqs,bqh->bsh", (bh, t, t), (bh, t, h))
  return out


def flops(spec: str, lhs: tuple[int, ...], rhs: tuple[int, ...]) -> int:
  """2 x the product of every distinct index's size."""
  sizes = dict(zip(spec.split("->")[0].split(",")[0], lhs))
  sizes.update(zip(spec.split("->")[0].split(",")[1], rhs))
  n = 2
  for s in sizes.values():
    n *= s
  return n


def _fns(spec: str, lhs_shape, rhs_shape) -> tuple[dict[str, Any], float | None]:
  """The XLA product (and torch's, when torch imports), and the largest
  relative difference of torch's result from XLA's."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  a = rng.normal(size=lhs_shape).astype(np.float32)
  b = rng.normal(size=rhs_shape).astype(np.float32)
  xa, xb = jnp.asarray(a), jnp.asarray(b)
  product = jax.jit(lambda a, b: jnp.einsum(spec, a, b))
  fns: dict[str, Any] = {"xla": lambda: product(xa, xb)}
  try:
    import torch
  except ImportError:
    return fns, None
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  fns["torch"] = lambda: torch.einsum(spec, ta, tb)
  want = np.asarray(product(xa, xb))
  got = fns["torch"]().numpy()
  return fns, float(np.abs(got - want).max() / np.abs(want).max())


def run_shape(name: str, repeats: int, warmup: int) -> dict[str, Any]:
  rows = []
  for label, (spec, lhs, rhs) in products(SHAPES[name]).items():
    fns, diff = _fns(spec, lhs, rhs)
    times = common.alternate(fns, repeats=repeats, steps_per_repeat=1, warmup=warmup)
    n = flops(spec, lhs, rhs)
    row: dict[str, Any] = {"product": label, "einsum": spec, "lhs": list(lhs), "rhs": list(rhs),
                           "flops": n, "relative_difference": diff}
    for side, ts in times.items():
      row[f"{side}_ms"] = round(common.median(ts) * 1e3, 3)
      row[f"{side}_gflops_per_sec"] = round(n / common.median(ts) / 1e9, 1)
    if "torch" in times:
      row["torch_over_xla"] = round(row["torch_ms"] / row["xla_ms"], 3)
    rows.append(row)
  total: dict[str, Any] = {"flops": sum(r["flops"] for r in rows)}
  for side in ("xla", "torch"):
    if all(f"{side}_ms" in r for r in rows):
      total[f"{side}_ms"] = round(sum(r[f"{side}_ms"] for r in rows), 3)
      total[f"{side}_gflops_per_sec"] = round(total["flops"] / total[f"{side}_ms"] / 1e6, 1)
  if "torch_ms" in total:
    total["torch_over_xla"] = round(total["torch_ms"] / total["xla_ms"], 3)
  return {"name": name, "shape": dict(zip(("tokens", "width", "mlp", "batch_heads", "sequence",
                                            "head_dim"), SHAPES[name])),
          "products": rows, "total": total}


def main(argv=None) -> dict[str, Any]:
  names, args = common.shape_args(argv, benchmark="matmul", shapes=SHAPES,
                                  default="vit_s16")
  results = {"benchmark": "matmul", "machine": common.machine(), "repeats": args.repeats,
             "matmul_peak_flops_per_sec": common.matmul_peak(), "shapes": {}}
  for name in names:
    r = run_shape(name, args.repeats, args.warmup)
    results["shapes"][name] = r
    print(f"\n{name}: float32 GFLOP/s, medians of {args.repeats}")
    print(f"{'product':<14}{'einsum':<15}{'GFLOP':>7}{'xla':>8}{'torch':>8}{'torch/xla':>11}")
    for row in [*r["products"], {"product": "total", "einsum": "", **r["total"]}]:
      torch_rate = row.get("torch_gflops_per_sec")
      ratio = row.get("torch_over_xla")
      print(f"{row['product']:<14}{row['einsum']:<15}{row['flops'] / 1e9:>7.2f}"
            f"{row['xla_gflops_per_sec']:>8.0f}{'-' if torch_rate is None else f'{torch_rate:.0f}':>8}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>11}")
  common.save("matmul", results, args.out, complete=args.complete)
  return results


if __name__ == "__main__":
  main()
