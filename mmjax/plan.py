"""python -m mmjax.plan --config=experiments/NAME.py[:ARGS] --topology=v5p:4x4x4 [--config.KEY=VALUE ...]

Compiles the real sharded train step ahead of time for a TPU topology on this
(CPU) machine, with no TPU and no data, and reports per chip: memory
(arguments, outputs, temporaries; total against the chip's HBM), the train
state's share (params, optimizer), FLOPs per step, and the collectives in the
compiled program. Exits 1 when the step does not fit in HBM.

  --topology=v5p:4x4x4 [--num_slices=2]   a TPU pod slice (needs libtpu: pip install -e '.[tpu-plan]')
  --devices=8 [--hbm_gib=16]              N fake CPU devices instead (fits only with --hbm_gib)
  --json=PATH                             the numbers as JSON as well

The mesh and the rules come from the config (e.g. --config.mesh.preset=fsdp), so
the plan is of the step `mmjax.train` would run. The Task is built from the
config alone (with_data=False): no dataset or tokenizer needs to exist here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import optax
from absl import app, flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from mmjax import backend, parallel
from mmjax.train import loop, optim, step as step_lib, tasks
from mmjax.train import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:16x16, v4:2x2x2")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices of that topology (multi-slice over DCN)")
_DEVICES = flags.DEFINE_integer("devices", 0, "plan for N fake CPU devices instead of a topology")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "memory per chip in GiB (default: the chip's HBM)")
_JSON = flags.DEFINE_string("json", None, "also write the plan as JSON here")
_TOP = flags.DEFINE_integer("top", 5, "how many of the largest buffers to list")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "write the compiled (per-chip) HLO text here")
flags.mark_flags_as_required(["config"])

GIB = 1 << 30
# User-allocatable HBM per chip (GiB), by the version in the topology name.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
OPENAI_BPE_VOCAB = 49408
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_FUSED_CALL = re.compile(r"=\s*(.+?)\s+fusion\(.*\bcalls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # v5p, or "cpu"
  hbm_bytes: int | None
  peak_flops: float | None  # dense bf16 per chip


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_TOPOLOGY.value) == bool(_DEVICES.value):
    raise app.UsageError("give one of --topology=v5p:4x4x4 or --devices=N")
  devices, chip = target_devices(_TOPOLOGY.value, _NUM_SLICES.value, _DEVICES.value,
                                 _HBM_GIB.value)
  report = plan(_CONFIG.value, devices, chip, top=_TOP.value, dump_hlo=_DUMP_HLO.value)
  report["config"] = _config_name()
  report["topology"] = _TOPOLOGY.value or f"cpu:{_DEVICES.value}"
  print(format_report(report))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)
  if report["fits"] is False:
    sys.exit(1)


def target_devices(topology: str | None, num_slices: int = 1, cpu_devices: int = 0,
                   hbm_gib: float = 0.0):
  """(devices to compile for, their Chip): a TPU topology's, or N CPU devices.

  Call it before anything starts a JAX backend (importing modules does not).
  """
  if cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    # Read when the CPU backend starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={cpu_devices}")
    devices = jax.devices()
    if len(devices) != cpu_devices:
      raise RuntimeError(f"asked for {cpu_devices} CPU devices but JAX has {len(devices)}; run "
                         f"mmjax.plan in a fresh process")
    return devices, Chip("cpu", int(hbm_gib * GIB) if hbm_gib else None, None)

  version = topology.split(":")[0].lower()
  jax.config.update("jax_platforms", "cpu")  # compile for the TPU, run nothing
  # Other JAX processes on this machine hold libtpu's lock file; planning
  # touches no TPU, so it may load libtpu beside them. The other two keep
  # libtpu from looking for a TPU VM's metadata (and warning when there is none).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology, version))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        **({"num_slices": num_slices} if num_slices > 1 else {}))
  except Exception as e:
    raise SystemExit(f"cannot describe TPU topology {topology!r} ({e}); is libtpu installed? "
                     f"pip install -e '.[tpu-plan]'") from e
  hbm = hbm_gib or HBM_GIB.get(version)
  peak = next((v for k, v in metrics_lib.PEAK_FLOPS if k in version), None)
  return list(desc.devices), Chip(version, int(hbm * GIB) if hbm else None, peak)


def _accelerator_type(topology: str, version: str) -> str:
  """v5p:4x4x4 -> v5p-128: v4 and v5p count TensorCores (two per chip), the rest chips."""
  dims = topology.split(":")[1] if ":" in topology else "1"
  chips = math.prod(int(d) for d in dims.split("x"))
  return f"{version}-{chips * 2 if version in ('v4', 'v5p') else chips}"


def plan(config, devices, chip: Chip, top: int = 5, dump_hlo: str | None = None) -> dict[str, Any]:
  """Compiles config's train step for `devices`; returns the per-chip numbers."""
  task = _task_without_data(config)
  s = loop.build(config, devices, task)
  mesh, rules = s["mesh"], s["rules"]
  train_step = step_lib.make_train_step(task, s["tx"], s["mask"], s["schedule"],
                                        config.optim.get("grad_accum", 1))
  batch_spec = task.batch_spec(config.batch_size)
  jitted = step_lib.jit_train_step(train_step, s["shardings"], mesh, batch_spec)
  state_in = loop.restore_target(s["abstract"], s["shardings"])
  batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                      sharding=parallel.batch_sharding(mesh, len(v.shape)))
              for k, v in batch_spec.items()}
  start = time.perf_counter()
  # The layers' forms for the target's platform, not this host's (mmjax.backend).
  tuned = backend.choose(config.get("cpu_tuning", "auto"), devices)
  with parallel.activate(mesh, rules), backend.cpu_tuning_as(tuned):
    traced = jitted.trace(state_in, batch_in)
    compiled = traced.lower().compile()
  compile_s = time.perf_counter() - start

  mem = compiled.memory_analysis()
  per_chip = {
      "arguments": mem.argument_size_in_bytes,
      "outputs": mem.output_size_in_bytes,
      "aliased": mem.alias_size_in_bytes,
      "temporaries": mem.temp_size_in_bytes,
      "code": mem.generated_code_size_in_bytes,
  }
  # Donated state: outputs that alias arguments take no extra room.
  per_chip["total"] = (per_chip["arguments"] + per_chip["outputs"] - per_chip["aliased"]
                       + per_chip["temporaries"] + per_chip["code"])
  per_chip["params"] = _shard_bytes(s["abstract"].params, s["shardings"].params)
  per_chip["optimizer"] = _shard_bytes(s["abstract"].opt_state, s["shardings"].opt_state)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(hlo)
  trained = jax.tree.map(lambda p, t: p.size if t else 0, s["abstract"].params, s["mask"])
  n = len(devices)
  return {
      "task": config.task,
      "global_batch": int(config.batch_size),
      "devices": n,
      "chip": chip.name,
      "hbm_bytes": chip.hbm_bytes,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "params": optim.count_params(s["abstract"].params),
      "trained_params": int(sum(jax.tree.leaves(trained))),
      "per_chip_bytes": {k: int(v) for k, v in per_chip.items()},
      "flops_per_chip": float(cost.get("flops", 0.0)) if cost else None,
      "step_flops_per_chip": jaxpr_flops(traced.jaxpr.jaxpr) / n,
      "model_flops_per_chip": task.flops_per_example() * config.batch_size / n,
      "peak_flops": chip.peak_flops,
      "collectives": collectives(hlo),
      "largest_buffers": largest_buffers(hlo, top),
      "batch_x_batch_buffers": square_buffers(hlo, int(config.batch_size)),
      "fits": None if chip.hbm_bytes is None else per_chip["total"] <= chip.hbm_bytes,
      "compile_seconds": round(compile_s, 1),
  }


def jaxpr_flops(jaxpr, times: float = 1.0) -> float:
  """FLOPs of the matmuls (dot_general, convolutions) in a jaxpr, 2 per
  multiply-add: a scan's body times its length, a cond's costliest branch, a
  while loop's body once. In a train step's jaxpr the backward pass and what
  remat recomputes are explicit, so this is the work the step asks for
  (XLA's cost analysis of the compiled program counts a loop body once)."""
  from jax.extend import core as jcore
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += times * 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)
    elif name == "conv_general_dilated":  # each output: the kernel of one output feature
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += times * 2.0 * math.prod(out) * math.prod(rhs) / out_features
    subs = [x.jaxpr if isinstance(x, jcore.ClosedJaxpr) else x
            for value in eqn.params.values()
            for x in (value if isinstance(value, (tuple, list)) else (value,))
            if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr))]
    if name == "cond":
      total += max((jaxpr_flops(j, times) for j in subs), default=0.0)
    else:
      inner = times * (eqn.params["length"] if name == "scan" else 1)
      total += sum(jaxpr_flops(j, inner) for j in subs)
  return total


def _task_without_data(config):
  if config.task == "clip" and not config.model.text.get("vocab_size"):
    logging.warning("model.text.vocab_size is 0 (the tokenizer's): planning with %d "
                    "(OpenAI's BPE); set --config.model.text.vocab_size otherwise",
                    OPENAI_BPE_VOCAB)
    config.model.text.vocab_size = OPENAI_BPE_VOCAB
  try:
    return tasks.build_task(config, with_data=False)
  except TypeError as e:  # a Task family whose constructor needs no data anyway
    if "with_data" not in str(e):
      raise
    return tasks.build_task(config)


def _shard_bytes(abstract, shardings) -> int:
  """Bytes of one device's shards of a tree (shards are equal, or replicated)."""
  def one(leaf, sharding):
    if isinstance(leaf, optax.MaskedNode):  # a frozen param's missing optimizer state
      return 0
    return math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize

  sizes = jax.tree.map(one, abstract, shardings,
                       is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return int(sum(jax.tree.leaves(sizes)))


def _shapes(text: str):
  for dtype, dims in _SHAPE.findall(text):
    shape = tuple(int(d) for d in dims.split(",") if d)
    yield f"{dtype}[{','.join(map(str, shape))}]", shape, math.prod(shape) * _DTYPE_BYTES[dtype]


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """Per kind: how many sit in the program text (one inside the layer loop runs
  once per layer) and the largest result buffer of one, per chip.

  A collective that XLA fused with its neighbours (TPU's reduce-scatter is a
  fusion calling %all-reduce-scatter.N) counts once, as the fusion's kind.
  """
  out = {kind: {"count": 0, "largest_bytes": 0} for kind in COLLECTIVES}
  computation = ""
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    if _collective_kind(computation):  # the body of a fused collective: counted at its call
      continue
    fused = _FUSED_CALL.search(line)
    direct = _COLLECTIVE.search(line)
    if fused and _collective_kind(fused.group(2)):
      result, kind = fused.group(1), _collective_kind(fused.group(2))
    elif direct:
      result, kind = direct.group(1), direct.group(2)
    else:
      continue
    out[kind]["count"] += 1
    out[kind]["largest_bytes"] = max([out[kind]["largest_bytes"]] +
                                     [b for _, _, b in _shapes(result)])
  return out


def _collective_kind(name: str) -> str | None:
  if name.startswith("all-reduce-scatter"):
    return "reduce-scatter"
  return next((k for k in COLLECTIVES if name.startswith(k)), None)


def largest_buffers(hlo: str, top: int = 5) -> list[dict[str, Any]]:
  """The largest array shapes anywhere in the compiled (per-chip) program."""
  seen = {}
  for name, _, nbytes in _shapes(hlo):
    seen[name] = nbytes
  return [{"shape": k, "bytes": v} for k, v in sorted(seen.items(), key=lambda kv: -kv[1])[:top]]


def square_buffers(hlo: str, batch: int) -> list[str]:
  """Per-chip [B, B] arrays (size-1 dims aside): a whole global logit matrix."""
  return sorted({name for name, shape, _ in _shapes(hlo)
                 if tuple(d for d in shape if d != 1) == (batch, batch)})


def format_report(r: dict[str, Any]) -> str:
  gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
  pc = r["per_chip_bytes"]
  lines = [
      f"plan: {r.get('config', r['task'])}  on {r.get('topology', r['chip'])} "
      f"({r['devices']} chips)  global batch {r['global_batch']}",
      f"mesh {r['mesh']}   params {r['params'] / 1e6:.1f} M "
      f"(trained {r['trained_params'] / 1e6:.1f} M)   compiled in {r['compile_seconds']} s",
      "per chip:",
      f"  params                {gib(pc['params'])}",
      f"  optimizer state       {gib(pc['optimizer'])}",
      f"  arguments             {gib(pc['arguments'])}   (state + batch)",
      f"  outputs               {gib(pc['outputs'])}   ({gib(pc['aliased']).strip()} of them "
      f"donated arguments)",
      f"  temporaries           {gib(pc['temporaries'])}",
      f"  generated code        {gib(pc['code'])}",
  ]
  if r["hbm_bytes"]:
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"  total                 {gib(pc['total'])}   of {gib(r['hbm_bytes']).strip()} "
                 f"HBM ({100 * pc['total'] / r['hbm_bytes']:.0f}%): {verdict}")
  else:
    lines.append(f"  total                 {gib(pc['total'])}   (no HBM size: give --hbm_gib)")
  flops, step, model = r["flops_per_chip"], r["step_flops_per_chip"], r["model_flops_per_chip"]
  line = (f"FLOPs per step per chip: {step:.3g} in the step's matmuls (backward and remat "
          f"included), {model:.3g} model (6N, no remat; {model / max(step, 1.0):.0%} of the "
          f"step's)")
  if flops:
    line += f", {flops:.3g} XLA's count (a loop body once)"
  lines.append(line)
  if r["peak_flops"]:
    lines.append(f"at {r['peak_flops'] / 1e12:.0f} TFLOP/s peak the step's matmuls take "
                 f"{step / r['peak_flops']:.3f} s (compute bound only: memory and network "
                 f"time not modelled)")
  lines.append("collectives in the program (count, largest result per chip):")
  for kind, c in r["collectives"].items():
    lines.append(f"  {kind:20s} {c['count']:4d}  {c['largest_bytes'] / (1 << 20):10.1f} MiB")
  lines.append("largest buffers per chip: " + ", ".join(
      f"{b['shape']} {b['bytes'] / (1 << 20):.0f} MiB" for b in r["largest_buffers"]))
  square = r["batch_x_batch_buffers"]
  lines.append(f"B x B ({r['global_batch']} x {r['global_batch']}) buffers on one chip: "
               + (", ".join(square) if square else "none"))
  return "\n".join(lines)


def _config_name() -> str:
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "config"


if __name__ == "__main__":
  app.run(main)
