"""A roofline for one compiled train step: a lower bound on its time per chip.

The step takes at least as long as the slowest of
  compute   the matmul FLOPs it asks for / the chip's peak FLOP/s,
  hbm       the bytes its top-level instructions read and write / HBM bandwidth,
  ici       the bytes its collectives move through the chip's links / their bandwidth,
  dcn       the same for collectives whose groups span slices / the chip's DCN share,
each at its public peak and with perfect overlap. The bound that dominates
names what would limit the step; the predicted MFU is the model's FLOPs over
(that time x peak).

Everything is read from the compiled per-chip program (HLO text): loop bodies
count as often as their loop runs (XLA's own cost analysis counts them once).

HBM traffic: each instruction outside a fusion reads its operands and writes
its result; a slice of an operand (dynamic-slice, also inside a fusion) reads
only the slice, and an in-place dynamic-update-slice writes only the update.
Bitcasts, tuples and parameters move nothing. An array in a tiled layout
(TPU's T(8,128)) takes its padded size.

Network traffic per chip of one collective over a group of n chips, result R
bytes per chip (the ring algorithms' volumes): all-gather (n-1)/n R,
reduce-scatter (n-1) R, all-reduce 2 (n-1)/n R, all-to-all (n-1)/n R,
collective-permute R. A group moves over the torus axes along which its chips
differ, two ports per axis (a ring each way), each port at the chip's
bidirectional ICI bandwidth / ports / 2 per direction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
               "u64": 8, "f64": 8, "c64": 8, "c128": 16}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\](?:\{([^}]*)\})?")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's public peaks (None: not known; that bound is left out)."""
  name: str
  hbm_bytes: int | None  # capacity
  peak_flops: float | None  # dense bf16 FLOP/s
  hbm_bw: float | None = None  # bytes/s
  ici_bw: float | None = None  # bytes/s, bidirectional, all ports together
  ici_ports: int = 0
  dcn_bw: float | None = None  # bytes/s per chip
  source: str = ""


GIB = 1 << 30
# Per chip, from the vendor's spec pages (source). v5e and v6e hosts hold 8
# chips; v5e's DCN share is its host's 2 x 100 Gbps NICs over them.
CHIPS = {
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9, 6, 50e9 / 8,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9, 4, 2 * 100e9 / 8 / 8,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1638e9, 800e9, 4, None,
                "https://cloud.google.com/tpu/docs/v6e"),
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, None, 6, None,
               "https://cloud.google.com/tpu/docs/v4"),
}
CHIPS["v5litepod"] = dataclasses.replace(CHIPS["v5e"], name="v5litepod")

_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)="
                     r"%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"^[su](32|64)\[\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
# Moves no bytes of its own (a while's or call's work is its body's).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "while", "conditional", "call", "async-start",
         "async-update", "async-done", "opt-barrier", "add-dependency"}


@dataclasses.dataclass
class Instruction:
  name: str
  op: str
  result: str  # the result type text
  operands: list[str]
  attrs: str  # everything after the operand list
  args: str = ""  # the operand list as written (a constant's value, a parameter's index)
  root: bool = False  # the computation's result

  @property
  def nbytes(self) -> float:
    return sum(b for _, _, b in shapes(self.result))


@dataclasses.dataclass
class Program:
  """A compiled HLO module's computations, by name, in text order."""
  computations: dict[str, list[Instruction]]
  entry: str

  @property
  def by_name(self) -> dict[str, Instruction]:
    if not hasattr(self, "_by_name"):
      self._by_name = {i.name: i for c in self.computations.values() for i in c}
    return self._by_name


def shapes(text: str):
  """(name, shape, bytes) of each array type in `text`; the bytes of its
  tiled layout where it has one (TPU's T(8,128) pads the two minor dims)."""
  for m in SHAPE.finditer(text):
    dtype, dims, layout = m.groups()
    shape = tuple(int(d) for d in dims.split(",") if d)
    yield (f"{dtype}[{','.join(map(str, shape))}]", shape,
           math.prod(_tiled(shape, layout)) * DTYPE_BYTES[dtype])


def _tiled(shape: tuple[int, ...], layout: str | None) -> tuple[int, ...]:
  """The shape padded to the layout's first tile, e.g. {1,0:T(8,128)}."""
  if not layout or ":" not in layout:
    return shape
  order, _, rest = layout.partition(":")
  tile = re.match(r"T\(([\d,]+)\)", rest)
  if not tile:
    return shape
  minor_to_major = [int(d) for d in order.split(",") if d]
  if sorted(minor_to_major) != list(range(len(shape))):
    return shape
  physical = [shape[d] for d in reversed(minor_to_major)]  # major to minor
  t = [int(d) for d in tile.group(1).split(",")]
  if not physical:
    return ()
  k = min(len(t), len(physical))
  padded = physical[:-k] + [-(-d // b) * b for d, b in zip(physical[-k:], t[-k:])]
  return tuple(padded)


def parse(hlo: str) -> Program:
  computations, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith("ENTRY"):
        entry = header.group(1)
      continue
    if current is None:
      continue
    m = _INSTRUCTION.match(line)
    if m:
      operands, attrs = _split_operands(m.group(5))
      current.append(Instruction(m.group(2), m.group(4), m.group(3),
                                 re.findall(r"%([\w.\-]+)", operands), attrs, operands,
                                 root=bool(m.group(1))))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return Program(computations, entry)


def _split_operands(rest: str) -> tuple[str, str]:
  depth = 0
  for i, ch in enumerate(rest):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      if depth == 0:
        return rest[:i], rest[i + 1:]
      depth -= 1
  return rest, ""


def _called(inst: Instruction, key: str) -> str | None:
  for k, name in _CALLED.findall(inst.attrs):
    if k == key:
      return name
  return None


def trip_count(program: Program, inst: Instruction) -> int | None:
  """A while loop's trip count: XLA's own annotation, else the one scalar
  integer constant its condition compares against (scans count from 0 by 1)."""
  known = _TRIP.search(inst.attrs)
  if known:
    return int(known.group(1))
  condition = _called(inst, "condition")
  consts = set()
  for c in _reachable(program, condition):
    for i in program.computations.get(c, []):
      if i.op == "constant" and _CONSTANT.match(i.result) and re.fullmatch(r"-?\d+", i.args):
        consts.add(int(i.args))
  return consts.pop() if len(consts) == 1 else None


def _reachable(program: Program, name: str | None) -> list[str]:
  out, todo = [], [name] if name else []
  while todo:
    c = todo.pop()
    if c in out or c not in program.computations:
      continue
    out.append(c)
    for i in program.computations[c]:
      todo += [n for _, n in _CALLED.findall(i.attrs)]
  return out


# ----------------------------------------------------------------------- HBM

def _fusion_io(program: Program, inst: Instruction, callee: str) -> float:
  """Bytes a fusion reads and writes: an operand only sliced inside reads its
  slices; an output that is a dynamic-update-slice into an operand (in place)
  writes the update only, and that operand is not read."""
  body = program.computations.get(callee, [])
  if not body:
    return inst.nbytes
  local = {i.name: i for i in body}
  params = {i.name: int(i.args) for i in body if i.op == "parameter"}
  users: dict[str, list[Instruction]] = {}
  for i in body:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = next((i for i in body if i.root), body[-1])
  total, in_place = 0.0, set()
  for name in (root.operands if root.op == "tuple" else [root.name]):
    out = local.get(name)
    while out is not None and out.op == "bitcast" and out.operands[0] in local:
      out = local[out.operands[0]]
    if out is not None and out.op == "dynamic-update-slice" and out.operands[0] in params:
      in_place.add(out.operands[0])
      update = local.get(out.operands[1])
      total += update.nbytes if update is not None else 0.0
    elif out is not None:
      total += local[name].nbytes
  by_name = program.by_name
  for pname, index in params.items():
    if index >= len(inst.operands) or pname in in_place:
      continue
    full = by_name[inst.operands[index]].nbytes if inst.operands[index] in by_name else 0.0
    uses = users.get(pname, [])
    if uses and all(u.op in ("dynamic-slice", "slice") and u.operands[0] == pname for u in uses):
      total += min(full, sum(u.nbytes for u in uses))
    else:
      total += full
  return total


def instruction_bytes(program: Program, inst: Instruction) -> float:
  """HBM bytes one execution of `inst` reads and writes."""
  if inst.op in _FREE or inst.op.endswith("-done"):
    return 0.0
  by_name = program.by_name
  if inst.op == "fusion":
    return _fusion_io(program, inst, _called(inst, "calls") or "")
  if inst.op == "dynamic-slice":
    return 2.0 * inst.nbytes
  if inst.op == "dynamic-update-slice":
    update = by_name.get(inst.operands[1]) if len(inst.operands) > 1 else None
    return 2.0 * (update.nbytes if update is not None else inst.nbytes)
  if inst.op == "copy-start":  # result: (destination, source, context)
    src = by_name.get(inst.operands[0]) if inst.operands else None
    return 2.0 * (src.nbytes if src is not None else 0.0)
  reads = sum(by_name[o].nbytes for o in inst.operands if o in by_name)
  return reads + inst.nbytes


# ---------------------------------------------------------------- collectives

def collective_kind(inst: Instruction) -> str | None:
  """The collective an instruction runs: its op (sync or async), or for a
  fusion the collective its called computation is named after (TPU's
  reduce-scatter is a fusion calling %all-reduce-scatter.N)."""
  op = inst.op[:-len("-start")] if inst.op.endswith("-start") else inst.op
  if op in COLLECTIVES:
    return op
  if inst.op == "fusion":
    callee = _called(inst, "calls") or ""
    if callee.startswith("all-reduce-scatter") or callee.startswith("reduce-scatter"):
      return "reduce-scatter"
    return next((k for k in COLLECTIVES if callee.startswith(k)), None)
  return None


def replica_groups(attrs: str, n_devices: int) -> list[list[int]] | None:
  """The device groups of a collective from its attributes (explicit lists,
  the iota form [G,S]<=[dims]T(perm), or the mesh form), None if unstated."""
  m = _GROUPS_IOTA.search(attrs)
  if m:
    g, s = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return ids.reshape(g, s).tolist()
  m = _GROUPS_MESH.search(attrs)
  if m:
    axes = re.findall(r"'([\w]+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    chosen = [names.index(a) for a in re.findall(r"'([\w]+)'", m.group(2))]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    rest = [i for i in range(len(sizes)) if i not in chosen]
    size = math.prod(sizes[i] for i in chosen)
    return ids.transpose(rest + chosen).reshape(-1, size).tolist()
  m = _GROUPS_LIST.search(attrs)
  if m and m.group(1):
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
  m = _PAIRS.search(attrs)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
  return None if n_devices is None else [list(range(n_devices))]


def traffic(kind: str, result_bytes: float, n: int) -> float:
  """Bytes one chip receives in a ring collective over n chips (result per chip)."""
  if n <= 1:
    return 0.0
  return {"all-gather": (n - 1) / n, "reduce-scatter": n - 1.0, "all-reduce": 2 * (n - 1) / n,
          "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind] * result_bytes


@dataclasses.dataclass
class Links:
  """Where the devices of the compiled program sit: per program device id,
  its torus coordinates and slice."""
  coords: Sequence[Sequence[int]] | None
  slices: Sequence[int]

  @classmethod
  def of(cls, devices) -> "Links":
    coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
    return cls(coords if all(coords) else None,
               [int(getattr(d, "slice_index", 0) or 0) for d in devices])

  def span(self, group: Sequence[int]) -> tuple[int, bool]:
    """(torus axes along which the group's chips differ, whether it spans slices)."""
    if any(g >= len(self.slices) for g in group):
      return 0, False
    over_dcn = len({self.slices[g] for g in group}) > 1
    if self.coords is None:
      return 0, over_dcn
    axes = sum(len({self.coords[g][a] for g in group}) > 1 for a in range(len(self.coords[0])))
    return axes, over_dcn


# ---------------------------------------------------------------------- totals

@dataclasses.dataclass
class Totals:
  hbm_bytes: float = 0.0
  ici_seconds: float = 0.0
  dcn_seconds: float = 0.0
  ici_bytes: float = 0.0
  dcn_bytes: float = 0.0
  unknown_trips: int = 0
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=lambda: {
      k: {"count": 0, "executed": 0.0, "largest_bytes": 0, "traffic_bytes": 0.0,
          "seconds": 0.0} for k in COLLECTIVES})

  def add(self, other: "Totals", times: float) -> None:
    self.hbm_bytes += times * other.hbm_bytes
    self.ici_seconds += times * other.ici_seconds
    self.dcn_seconds += times * other.dcn_seconds
    self.ici_bytes += times * other.ici_bytes
    self.dcn_bytes += times * other.dcn_bytes
    self.unknown_trips += other.unknown_trips
    for k, c in other.collectives.items():
      mine = self.collectives[k]
      mine["count"] += c["count"]
      mine["executed"] += times * c["executed"]
      mine["largest_bytes"] = max(mine["largest_bytes"], c["largest_bytes"])
      for key in ("traffic_bytes", "seconds"):
        mine[key] += times * c[key]


def analyse(program: Program, chip: Chip, links: Links | None = None,
            loops: bool = True) -> Totals:
  """HBM bytes, network bytes and network seconds of one step: each loop body
  times its trip count (loops=False: once, as XLA's cost analysis counts)."""
  memo: dict[str, Totals] = {}
  n = len(links.slices) if links else None

  def collective(inst: Instruction, kind: str, out: Totals) -> None:
    # The result per chip; a fused reduce-scatter's result is its output.
    result = inst.nbytes
    if inst.op.endswith("-start") and inst.result.startswith("("):
      # (operand, result[, contexts]): the result is the larger, except that
      # a reduce-scatter's is the smaller; u32[] contexts are not data.
      parts = [b for _, shape, b in shapes(inst.result) if shape]
      result = min(parts) if kind == "reduce-scatter" else max(parts)
    attrs = inst.attrs
    if inst.op == "fusion":  # the groups are on the collective inside
      inner = program.computations.get(_called(inst, "calls") or "", [])
      attrs = next((i.attrs for i in inner if "replica_groups" in i.attrs), attrs)
    groups = replica_groups(attrs, n) or [[0]]
    group = groups[0]
    size = 2 if kind == "collective-permute" else len(group)
    moved = traffic(kind, result, size)
    axes, over_dcn = links.span(group) if links else (0, False)
    if over_dcn and chip.dcn_bw:
      seconds = moved / chip.dcn_bw
      out.dcn_bytes += moved
      out.dcn_seconds += seconds
    else:
      ports = chip.ici_ports or 1
      port_bw = (chip.ici_bw or 0.0) / ports / 2  # one direction of one port
      used = min(ports, 2 * axes) if axes else ports
      seconds = moved / (used * port_bw) if port_bw else 0.0
      out.ici_bytes += moved
      out.ici_seconds += seconds
    c = out.collectives[kind]
    c["count"] += 1
    c["executed"] += 1
    c["largest_bytes"] = max(c["largest_bytes"], int(result))
    c["traffic_bytes"] += moved
    c["seconds"] += seconds

  def walk(name: str) -> Totals:
    if name in memo:
      return memo[name]
    out = Totals()
    memo[name] = out  # recursion guard
    for inst in program.computations.get(name, []):
      kind = collective_kind(inst)
      if kind:
        collective(inst, kind, out)
      out.hbm_bytes += instruction_bytes(program, inst)
      if inst.op == "while":
        trips = trip_count(program, inst)
        if trips is None:
          out.unknown_trips += 1
        out.add(walk(_called(inst, "body")), (trips or 1) if loops else 1)
      elif inst.op == "conditional":
        names = [b.strip().lstrip("%") for m in _BRANCHES.findall(inst.attrs)
                 for b in m.split(",")]
        names += [x for x in (_called(inst, "true_computation"),
                              _called(inst, "false_computation")) if x]
        branches = [walk(b) for b in names]
        if branches:
          out.add(max(branches, key=lambda t: t.hbm_bytes + t.ici_bytes), 1)
      elif inst.op in ("call", "async-start"):
        callee = _called(inst, "to_apply") or _called(inst, "calls")
        if callee:
          out.add(walk(callee), 1)
    return out

  return walk(program.entry)


def predict(flops: float, model_flops: float, totals: Totals, chip: Chip) -> dict[str, Any]:
  """The bounds in seconds, the one that dominates, and the predicted MFU."""
  bounds = {}
  if chip.peak_flops:
    bounds["compute"] = flops / chip.peak_flops
  if chip.hbm_bw:
    bounds["hbm"] = totals.hbm_bytes / chip.hbm_bw
  if chip.ici_bw:
    bounds["ici"] = totals.ici_seconds
  if totals.dcn_bytes and chip.dcn_bw:
    bounds["dcn"] = totals.dcn_seconds
  if not bounds:
    return {"step_s": None, "mfu": None, "bound": None, "seconds": {}}
  bound = max(bounds, key=bounds.get)
  step = bounds[bound]
  mfu = model_flops / (step * chip.peak_flops) if chip.peak_flops and step > 0 else None
  return {"step_s": step, "mfu": mfu, "bound": bound, "seconds": bounds,
          "hbm_bytes": totals.hbm_bytes, "ici_bytes": totals.ici_bytes,
          "dcn_bytes": totals.dcn_bytes, "loops_of_unknown_length": totals.unknown_trips,
          "chip": {k: v for k, v in dataclasses.asdict(chip).items() if k != "hbm_bytes"}}


def custom_calls(program: Program) -> dict[str, int]:
  """custom-call targets in the program and how often each appears; a Pallas
  kernel on TPU (target tpu_custom_call) by its instruction's name."""
  out: dict[str, int] = {}
  for c in program.computations.values():
    for i in c:
      if i.op == "custom-call":
        m = re.search(r'custom_call_target="([^"]+)"', i.attrs)
        key = m.group(1) if m else "?"
        if key == "tpu_custom_call":
          key = key + ":" + re.sub(r"[.]\d+$", "", i.name)
        out[key] = out.get(key, 0) + 1
  return out


def attention_kernels(program: Program) -> dict[str, int]:
  """The fused attention kernels the program calls and how often (splash on
  TPU, cuDNN's fused attention on GPU); empty when attention is plain matmuls."""
  words = ("attention", "flash", "splash", "fmha", "_mha")
  return {k: n for k, n in sorted(custom_calls(program).items())
          if any(w in k.lower() for w in words)}


def gathers_as_all_reduce(program: Program) -> int:
  """All-reduces whose operands are dynamic-update-slices into a buffer: an
  all-gather written as 'each chip fills its slot of a zeroed buffer, then
  all sum', which moves twice a ring all-gather's bytes. TPU's compiler
  writes FSDP's weight gathers this way; the roofline charges what it runs."""
  by_name = program.by_name
  count = 0
  for c in program.computations.values():
    for i in c:
      if collective_kind(i) == "all-reduce" and i.op != "fusion" and any(
          "dynamic-update-slice" in o or (o in by_name and by_name[o].op == "dynamic-update-slice")
          for o in i.operands):
        count += 1
  return count
