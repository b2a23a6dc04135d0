"""python -m mmjax.plan --config=experiments/NAME.py[:ARGS] --topology=v5p:4x4x4 [--config.KEY=VALUE ...]

Compiles the real sharded train step ahead of time for a TPU topology on this
(CPU) machine, with no TPU and no data, and reports per chip: memory
(arguments, outputs, temporaries; total against the chip's HBM), the train
state's share (params, optimizer), FLOPs per step, the collectives in the
compiled program, and a roofline: the step's lower bound from compute, HBM
traffic and network traffic at the chip's public peaks, the bound that
dominates and the predicted MFU (mmjax.roofline). Exits 1 when the step does
not fit in HBM.

  --topology=v5p:4x4x4 [--num_slices=2]   a TPU pod slice (needs libtpu: pip install -e '.[tpu-plan]')
  --devices=8 [--hbm_gib=16]              N fake CPU devices instead (fits only with --hbm_gib)
  --sweep                                 every mesh preset and data x fsdp split, side by side
  --json=PATH                             the numbers as JSON as well

The mesh and the rules come from the config (e.g. --config.mesh.preset=fsdp), so
the plan is of the step `mmjax.train` would run. The Task is built from the
config alone (with_data=False): no dataset or tokenizer needs to exist here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import optax
from absl import app, flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from mmjax import backend, parallel, roofline
from mmjax.train import loop, optim, step as step_lib, tasks
from mmjax.train import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:16x16, v4:2x2x2")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices of that topology (multi-slice over DCN)")
_DEVICES = flags.DEFINE_integer("devices", 0, "plan for N fake CPU devices instead of a topology")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "memory per chip in GiB (default: the chip's HBM)")
_JSON = flags.DEFINE_string("json", None, "also write the plan as JSON here")
_TOP = flags.DEFINE_integer("top", 5, "how many of the largest buffers to list")
_SWEEP = flags.DEFINE_bool("sweep", False, "plan each mesh preset and data x fsdp split that "
                            "fits the chips; print them side by side, best predicted MFU first")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "write the compiled (per-chip) HLO text here")
flags.mark_flags_as_required(["config"])

GIB = roofline.GIB
Chip = roofline.Chip
OPENAI_BPE_VOCAB = 49408


class DoesNotFit(Exception):
  """The TPU compiler refused the step: it needs more HBM than the chip has."""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_TOPOLOGY.value) == bool(_DEVICES.value):
    raise app.UsageError("give one of --topology=v5p:4x4x4 or --devices=N")
  devices, chip = target_devices(_TOPOLOGY.value, _NUM_SLICES.value, _DEVICES.value,
                                 _HBM_GIB.value)
  where = {"config": _config_name(), "topology": _TOPOLOGY.value or f"cpu:{_DEVICES.value}"}
  if _SWEEP.value:
    rows = sweep(_CONFIG.value, devices, chip, top=_TOP.value)
    for r in rows:
      r.update(where)
    print(format_sweep(rows))
    out = {**where, "sweep": rows}
    fits = any("error" not in r and r["fits"] is not False for r in rows)
  else:
    try:
      out = plan(_CONFIG.value, devices, chip, top=_TOP.value, dump_hlo=_DUMP_HLO.value)
    except DoesNotFit as e:
      print(f"plan: {where['config']} on {where['topology']}: DOES NOT FIT, the compiler "
            f"refused it: {e}\n  (less memory per chip: more remat, e.g. --config.model.remat=full; "
            f"a smaller --config.batch_size; or --sweep over the meshes)")
      sys.exit(1)
    out.update(where)
    print(format_report(out))
    fits = out["fits"] is not False
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2, default=float)
  if not fits:
    sys.exit(1)


def sweep_meshes(n: int, num_slices: int = 1) -> dict[str, dict[str, Any]]:
  """The meshes --sweep tries on n chips: the presets, and data x fsdp splits
  with fsdp of 4, 8 or 16 (between pure data and pure FSDP parallelism)."""
  meshes = {"dp": {"preset": "dp"}, "fsdp": {"preset": "fsdp"}}
  if n % 4 == 0 and n > 4:
    meshes["fsdp_tensor"] = {"preset": "fsdp_tensor", "tensor": 4}
  for f in (4, 8, 16):
    if n % f == 0 and 1 < n // f and (n // f) % num_slices == 0:
      meshes[f"data{n // f}_fsdp{f}"] = {"preset": "", "data": n // f, "fsdp": f, "tensor": 1}
  if num_slices > 1:
    meshes["multislice"] = {"preset": "multislice"}
  return meshes


def sweep(config, devices, chip: Chip, top: int = 5) -> list[dict[str, Any]]:
  """Plans config on each of sweep_meshes; fitting meshes first, by predicted
  MFU (best first). A mesh the model cannot use is a row with its error."""
  rows = []
  _default_vocab(config)  # once, not per mesh
  meshes = sweep_meshes(len(devices), parallel.num_slices(devices))
  for i, (name, mesh) in enumerate(meshes.items()):
    c = copy.deepcopy(config)
    with c.unlocked():
      c.mesh.update(mesh)
    logging.info("sweep %d/%d: mesh %s", i + 1, len(meshes), name)
    try:
      row = plan(c, devices, chip, top=top)
    except DoesNotFit as e:
      row = {"error": f"does not fit: {e}", "fits": False}
    except Exception as e:  # noqa: BLE001 (a mesh the model's shapes do not divide)
      row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "fits": None}
    row["mesh_name"] = name
    rows.append(row)

  def key(r):
    mfu = (r.get("predicted") or {}).get("mfu")
    return (r.get("fits") is not True, "error" in r, -(mfu or 0.0))
  return sorted(rows, key=key)


def format_sweep(rows: list[dict[str, Any]]) -> str:
  if not rows:
    return "no mesh to try"
  first = next((r for r in rows if "error" not in r), rows[0])
  lines = [f"plan sweep: {first.get('config')} on {first.get('topology')} "
           f"(global batch {first.get('global_batch')}), best predicted MFU first",
           f"  {'mesh':16s} {'axes':36s} {'GiB/chip':>9s} {'HBM':>5s} {'bound':>8s} "
           f"{'step ms':>9s} {'MFU':>6s}"]
  for r in rows:
    if "error" in r:
      lines.append(f"  {r['mesh_name']:16s} cannot plan: {r['error']}")
      continue
    p = r["predicted"]
    share = r["memory"]["share"]
    fits = "" if r["fits"] is not False else "  DOES NOT FIT"
    step = f"{1e3 * p['step_s']:9.1f}" if p.get("step_s") else f"{'-':>9s}"
    mfu = f"{100 * p['mfu']:5.1f}%" if p.get("mfu") is not None else f"{'-':>6s}"
    lines.append(f"  {r['mesh_name']:16s} {str(r['mesh']):36s} {r['memory']['total_gib']:9.2f} "
                 f"{(f'{100 * share:4.0f}%' if share else '    -'):>5s} {str(p.get('bound')):>8s} "
                 f"{step} {mfu}{fits}")
  return "\n".join(lines)


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
  chip = roofline.CHIPS.get(version) or Chip(
      version, None, next((v for k, v in metrics_lib.PEAK_FLOPS if k in version), None))
  if hbm_gib:
    chip = dataclasses.replace(chip, hbm_bytes=int(hbm_gib * GIB))
  return list(desc.devices), chip


def _accelerator_type(topology: str, version: str) -> str:
  """v5p:4x4x4 -> v5p-128: v4 and v5p count TensorCores (two per chip), the rest chips."""
  dims = topology.split(":")[1] if ":" in topology else "1"
  chips = math.prod(int(d) for d in dims.split("x"))
  return f"{version}-{chips * 2 if version in ('v4', 'v5p') else chips}"


def plan(config, devices, chip: Chip, top: int = 5, dump_hlo: str | None = None) -> dict[str, Any]:
  """Compiles config's train step for `devices`; returns the per-chip numbers."""
  # The layers' forms and kernels for the target's platform, not this host's.
  with backend.compiling_for(devices, config.get("cpu_tuning", "auto")):
    return _plan(config, devices, chip, top, dump_hlo)


def _plan(config, devices, chip: Chip, top: int, dump_hlo: str | None) -> dict[str, Any]:
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
  with parallel.activate(mesh, rules):
    traced = jitted.trace(state_in, batch_in)
    try:
      compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # libtpu refuses a program larger than HBM; say so as a plan would.
      raise DoesNotFit(str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]) from e
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
  program = roofline.parse(hlo)
  totals = roofline.analyse(program, chip, roofline.Links.of(list(mesh.devices.flat)))
  trained = jax.tree.map(lambda p, t: p.size if t else 0, s["abstract"].params, s["mask"])
  n = len(devices)
  step_flops = jaxpr_flops(traced.jaxpr.jaxpr) / n
  model_flops = task.flops_per_example() * config.batch_size / n
  fits = None if chip.hbm_bytes is None else per_chip["total"] <= chip.hbm_bytes
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
      "memory": {"total_gib": per_chip["total"] / GIB,
                 "hbm_gib": chip.hbm_bytes / GIB if chip.hbm_bytes else None,
                 "share": per_chip["total"] / chip.hbm_bytes if chip.hbm_bytes else None},
      "flops_per_chip": float(cost.get("flops", 0.0)) if cost else None,
      "step_flops_per_chip": step_flops,
      "model_flops_per_chip": model_flops,
      "peak_flops": chip.peak_flops,
      "predicted": roofline.predict(step_flops, model_flops, totals, chip),
      "collectives": totals.collectives,
      "gathers_as_all_reduce": roofline.gathers_as_all_reduce(program),
      "attention_kernels": roofline.attention_kernels(program),
      "largest_buffers": largest_buffers(hlo, top),
      "batch_x_batch_buffers": square_buffers(hlo, int(config.batch_size)),
      "fits": fits,
      "compile_seconds": round(compile_s, 1),
  }


def jaxpr_flops(jaxpr, times: float = 1.0) -> float:
  """FLOPs of the matmuls (dot_general, convolutions) in a jaxpr, 2 per
  multiply-add: a scan's body times its length, a Pallas kernel's body times
  its grid (blocks a mask lets it skip included), a shard_map's body times its
  shards, a cond's costliest branch, a while loop's body once. In a train step's jaxpr the backward pass and what
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
      if name == "pallas_call":  # a kernel's body runs once per grid step
        inner *= math.prod(eqn.params["grid_mapping"].grid)
      elif name == "shard_map":  # the body's shapes are one shard's: it runs on every one
        mesh = eqn.params["mesh"]
        axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes") or \
            mesh.axis_names
        inner *= math.prod(mesh.shape[a] for a in axes)
      total += sum(jaxpr_flops(j, inner) for j in subs)
  return total


def _task_without_data(config):
  _default_vocab(config)
  try:
    return tasks.build_task(config, with_data=False)
  except TypeError as e:  # a Task family whose constructor needs no data anyway
    if "with_data" not in str(e):
      raise
    return tasks.build_task(config)


def _default_vocab(config) -> None:
  if config.task == "clip" and not config.model.text.get("vocab_size"):
    logging.warning("model.text.vocab_size is 0 (the tokenizer's): planning with %d "
                    "(OpenAI's BPE); set --config.model.text.vocab_size otherwise",
                    OPENAI_BPE_VOCAB)
    config.model.text.vocab_size = OPENAI_BPE_VOCAB


def _shard_bytes(abstract, shardings) -> int:
  """Bytes of one device's shards of a tree (shards are equal, or replicated)."""
  def one(leaf, sharding):
    if isinstance(leaf, optax.MaskedNode):  # a frozen param's missing optimizer state
      return 0
    return math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize

  sizes = jax.tree.map(one, abstract, shardings,
                       is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return int(sum(jax.tree.leaves(sizes)))


def collectives(hlo: str) -> dict[str, dict[str, float]]:
  """Per kind: how many sit in the program text, how many run (loop bodies
  by their trip count), the largest result per chip and, on no chip's links,
  the bytes one chip receives (see mmjax.roofline)."""
  return roofline.analyse(roofline.parse(hlo), Chip("none", None, None)).collectives


def largest_buffers(hlo: str, top: int = 5) -> list[dict[str, Any]]:
  """The largest array shapes anywhere in the compiled (per-chip) program."""
  seen = {}
  for name, _, nbytes in roofline.shapes(hlo):
    seen[name] = nbytes
  return [{"shape": k, "bytes": v} for k, v in sorted(seen.items(), key=lambda kv: -kv[1])[:top]]


def square_buffers(hlo: str, batch: int) -> list[str]:
  """Per-chip [B, B] arrays (size-1 dims aside): a whole global logit matrix."""
  return sorted({name for name, shape, _ in roofline.shapes(hlo)
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
  lines += _roofline_lines(r)
  lines.append("collectives (in the program / run per step, largest result, bytes received, "
               "time on the links, per chip):")
  for kind, c in r["collectives"].items():
    if c["count"]:
      lines.append(f"  {kind:20s} {c['count']:4d} / {c['executed']:6.0f}  "
                   f"{c['largest_bytes'] / (1 << 20):9.1f} MiB  {c['traffic_bytes'] / GIB:9.2f} GiB"
                   f"  {1e3 * c['seconds']:9.2f} ms")
  if r.get("gathers_as_all_reduce"):
    lines.append(f"  ({r['gathers_as_all_reduce']} of the all-reduces gather: each chip's shard "
                 f"in a zeroed buffer, then summed; twice a ring all-gather's bytes)")
  lines.append("attention kernels: " + (", ".join(
      f"{k} x{n}" for k, n in r["attention_kernels"].items()) or
      "none (attention is plain matmuls)"))
  lines.append("largest buffers per chip: " + ", ".join(
      f"{b['shape']} {b['bytes'] / (1 << 20):.0f} MiB" for b in r["largest_buffers"]))
  square = r["batch_x_batch_buffers"]
  lines.append(f"B x B ({r['global_batch']} x {r['global_batch']}) buffers on one chip: "
               + (", ".join(square) if square else "none"))
  return "\n".join(lines)


def _roofline_lines(r: dict[str, Any]) -> list[str]:
  p = r.get("predicted") or {}
  if not p.get("step_s"):
    return ["roofline: no chip peaks for this target (a TPU topology has them)"]
  ms = lambda t: f"{1e3 * t:.1f} ms"  # noqa: E731
  parts = ", ".join(f"{k} {ms(v)}" for k, v in p["seconds"].items())
  mfu = f", predicted MFU {100 * p['mfu']:.1f}%" if p.get("mfu") is not None else ""
  lines = [f"roofline per step (lower bounds at peak): {parts}",
           f"  -> {p['bound']}-bound, step >= {ms(p['step_s'])}{mfu}  "
           f"(HBM traffic {p['hbm_bytes'] / GIB:.1f} GiB, ICI {p['ici_bytes'] / GIB:.2f} GiB"
           + (f", DCN {p['dcn_bytes'] / GIB:.2f} GiB" if p.get("dcn_bytes") else "") + ")"]
  if p.get("loops_of_unknown_length"):
    lines.append(f"  ({p['loops_of_unknown_length']} loop(s) of unknown length counted once)")
  return lines


def _config_name() -> str:
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "config"


if __name__ == "__main__":
  app.run(main)
