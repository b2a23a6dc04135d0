"""Softmax attention alone: mmjax's "cpu" form (`mmjax.models.attention`) against
`jax.nn.dot_product_attention`'s XLA path and torch's
`scaled_dot_product_attention` (when torch imports), forward and forward +
backward, timed in alternation in one process, medians over the repeats.

  python -m benchmarks.attention [--shapes=vit_s16,llava_gqa] [--out=FILE.json]

Shapes: `vit_s16` is one layer of the CLIP benchmark's ViT-S/16 tower (batch
32, 197 tokens, 6 heads of 64); `llava_gqa` a causal, padded LM layer with
grouped keys and values (torch: causal only, without the padding); `tiny`
is for CI. Ratios are `xla / ours` (above 1: ours is faster) and `torch / ours`.
"""

from __future__ import annotations

from typing import Any, Callable

from benchmarks import common

# (batch, queries, heads, kv heads, head dim, causal)
SHAPES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "vit_s16": (32, 197, 6, 6, 64, False),
    "llava_gqa": (16, 256, 8, 2, 64, True),
    "tiny": (2, 17, 4, 2, 8, True),
}


def _jax_fns(shape) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
  """The jitted forward and forward+backward of each JAX implementation, and
  the largest difference of each output from jax.nn's."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mmjax.models import attention, layers
  b, t, n, kv, h, causal = shape
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)).astype(np.float32) / np.sqrt(h))
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv, h)).astype(np.float32)) for _ in range(2))
  mask = None
  if causal:  # the last quarter of every other row is padding
    padding = np.ones((b, t), bool)
    padding[::2, -t // 4:] = False
    mask = layers.make_attention_mask(t, t, padding=jnp.asarray(padding), causal=True)
  cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
  fns, errors = {}, {}
  want = attention.dot_product_attention(q, k, v, mask, "xla")
  for name, impl in (("ours", "cpu"), ("xla", "xla")):
    def attend(q, k, v, impl=impl):
      return attention.dot_product_attention(q, k, v, mask, impl)
    fwd = jax.jit(attend)
    both = jax.jit(lambda q, k, v, attend=attend: jax.vjp(attend, q, k, v)[1](cotangent))
    fns[f"{name} fwd"] = lambda fwd=fwd: fwd(q, k, v)
    fns[f"{name} fwd+bwd"] = lambda both=both: both(q, k, v)
    errors[name] = float(jnp.abs(fwd(q, k, v) - want).max())
  return fns, errors


def _torch_fns(shape) -> dict[str, Callable[[], Any]]:
  try:
    import torch
  except ImportError:
    return {}
  b, t, n, kv, h, causal = shape
  gen = torch.Generator().manual_seed(0)
  q = torch.randn(b, n, t, h, generator=gen, requires_grad=True)
  k, v = (torch.randn(b, kv, t, h, generator=gen, requires_grad=True) for _ in range(2))
  cotangent = torch.randn(b, n, t, h, generator=gen)
  sdpa = torch.nn.functional.scaled_dot_product_attention
  kw = {"is_causal": causal, "enable_gqa": kv != n, "scale": 1.0}

  def fwd():
    with torch.no_grad():
      return sdpa(q, k, v, **kw)

  def both():
    return torch.autograd.grad(sdpa(q, k, v, **kw), (q, k, v), cotangent)

  return {"torch fwd": fwd, "torch fwd+bwd": both}


def run_shape(name: str, repeats: int, warmup: int) -> dict[str, Any]:
  shape = SHAPES[name]
  fns, errors = _jax_fns(shape)
  fns.update(_torch_fns(shape))
  times = common.alternate(fns, repeats=repeats, steps_per_repeat=1, warmup=warmup)
  ms = {k: round(common.median(v) * 1e3, 3) for k, v in times.items()}
  row: dict[str, Any] = {"name": name, "shape": dict(zip(
      ("batch", "queries", "heads", "kv_heads", "head_dim", "causal"), shape)),
      "median_ms": ms, "max_abs_difference_from_xla": errors["ours"]}
  for part in ("fwd", "fwd+bwd"):
    row[f"xla_over_ours_{part}"] = round(ms[f"xla {part}"] / ms[f"ours {part}"], 3)
    if f"torch {part}" in ms:
      row[f"torch_over_ours_{part}"] = round(ms[f"torch {part}"] / ms[f"ours {part}"], 3)
  return row


def main(argv=None) -> dict[str, Any]:
  names, args = common.shape_args(argv, benchmark="attention", shapes=SHAPES,
                                  default="vit_s16,llava_gqa")
  rows = [run_shape(n, args.repeats, args.warmup) for n in names]
  print(f"\n{'shape':<11}{'part':<9}{'ours ms':>9}{'xla ms':>9}{'torch ms':>10}"
        f"{'xla/ours':>10}{'torch/ours':>12}")
  for r in rows:
    for part in ("fwd", "fwd+bwd"):
      ms = r["median_ms"]
      torch_ms = ms.get(f"torch {part}")
      print(f"{r['name']:<11}{part:<9}{ms[f'ours {part}']:>9.1f}{ms[f'xla {part}']:>9.1f}"
            f"{'-' if torch_ms is None else f'{torch_ms:.1f}':>10}"
            f"{r[f'xla_over_ours_{part}']:>9.2f}x"
            f"{'-' if torch_ms is None else format(r[f'torch_over_ours_{part}'], '.2f') + 'x':>12}")
  results = {"benchmark": "attention", "machine": common.machine(), "repeats": args.repeats,
             "shapes": {r["name"]: r for r in rows}}
  common.save("attention", results, args.out, complete=args.complete)
  return results


if __name__ == "__main__":
  main()
