"""mmjax.roofline: reading a compiled program's bytes, loops and collectives,
and the bound they put on a step."""

import types

import jax
import jax.numpy as jnp
import pytest

from mmjax import roofline

LOOP_HLO = """\
%body (p: (s32[], f32[4,256], f32[3,256,256])) -> (s32[], f32[4,256], f32[3,256,256]) {
  %p = (s32[], f32[4,256]{1,0}, f32[3,256,256]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,256]{1,0} get-tuple-element(%p), index=1
  %w = f32[3,256,256]{2,1,0} get-tuple-element(%p), index=2
  %wi = f32[1,256,256]{2,1,0} dynamic-slice(%w, %i, %z, %z), dynamic_slice_sizes={1,256,256}
  %y = f32[4,256]{1,0} fusion(%x, %wi), kind=kOutput, calls=%mm
  %g = f32[4,256]{1,0} all-reduce(%y), replica_groups=[2,4]<=[8], to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,256]{1,0}, f32[3,256,256]{2,1,0}) tuple(%next, %g, %w)
}

%mm (a: f32[4,256], b: f32[1,256,256]) -> f32[4,256] {
  %a = f32[4,256]{1,0} parameter(0)
  %b = f32[1,256,256]{2,1,0} parameter(1)
  %b2 = f32[256,256]{1,0} bitcast(%b)
  ROOT %d = f32[4,256]{1,0} dot(%a, %b2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (p: (s32[], f32[4,256], f32[3,256,256])) -> pred[] {
  %p = (s32[], f32[4,256]{1,0}, f32[3,256,256]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4,256], w: f32[3,256,256]) -> f32[4,256] {
  %x = f32[4,256]{1,0} parameter(0)
  %w = f32[3,256,256]{2,1,0} parameter(1)
  %zero = s32[] constant(0)
  %t = (s32[], f32[4,256]{1,0}, f32[3,256,256]{2,1,0}) tuple(%zero, %x, %w)
  %loop = (s32[], f32[4,256]{1,0}, f32[3,256,256]{2,1,0}) while(%t), condition=%cond, body=%body
  %out = f32[4,256]{1,0} get-tuple-element(%loop), index=1
  %buf = f32[64,256]{1,0} dynamic-update-slice(%big, %out, %zero, %zero)
  ROOT %ag = f32[64,256]{1,0} all-reduce(%buf), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}
"""


def test_tiled_layouts_pad_their_minor_dims():
  [(name, shape, nbytes)] = roofline.shapes("bf16[4,64,3,4,16]{1,4,3,2,0:T(8,128)(2,1)}")
  assert name == "bf16[4,64,3,4,16]" and shape == (4, 64, 3, 4, 16)
  # Major to minor (dims 0, 2, 3, 4, 1): 4 x 3 x 4 x 16 x 64 (-> 128).
  assert nbytes == 4 * 3 * 4 * 16 * 128 * 2
  assert [b for *_, b in roofline.shapes("f32[3,40]{1,0:T(8,128)} f32[3,40]{0,1:T(8,128)}")] \
      == [8 * 128 * 4, 40 * 128 * 4]
  assert [b for *_, b in roofline.shapes("f32[32,64]{1,0} s32[]{:T(128)} bf16[100]{0:T(1024)}")] \
      == [32 * 64 * 4, 4, 1024 * 2]


def test_replica_groups_in_each_form():
  assert roofline.replica_groups("replica_groups={{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]
  assert roofline.replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert roofline.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}"
  assert roofline.replica_groups(mesh, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert roofline.replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]


def test_ring_traffic_per_kind():
  assert roofline.traffic("all-gather", 800, 8) == 700
  assert roofline.traffic("reduce-scatter", 100, 8) == 700  # its input is 8 x 100
  assert roofline.traffic("all-reduce", 800, 8) == 1400
  assert roofline.traffic("all-reduce", 800, 1) == 0


def test_loops_count_by_their_trips_and_slices_read_only_the_slice():
  program = roofline.parse(LOOP_HLO)
  [loop] = [i for i in program.computations["main"] if i.op == "while"]
  assert roofline.trip_count(program, loop) == 3
  chip = roofline.Chip("x", None, 1e12, hbm_bw=1e11, ici_bw=8e10, ici_ports=4)
  t = roofline.analyse(program, chip)
  x, w = 4 * 256 * 4, 256 * 256 * 4
  body = 2 * w + (x + w + x) + 2 * x + (4 + 4 + 4)  # slice, fusion, all-reduce, add
  entry = 2 * x + 2 * 64 * 256 * 4  # the update in place reads and writes the update
  assert t.hbm_bytes == pytest.approx(3 * body + entry)
  assert roofline.analyse(program, chip, loops=False).hbm_bytes == pytest.approx(body + entry)
  ar = t.collectives["all-reduce"]
  assert ar["count"] == 2 and ar["executed"] == 4
  # Without device positions a collective may use every port: 4 x 10 GB/s each way.
  moved = 3 * 2 * 3 / 4 * x + 2 * 7 / 8 * 64 * 256 * 4
  assert ar["traffic_bytes"] == pytest.approx(moved)
  assert t.ici_seconds == pytest.approx(moved / 4e10)
  assert roofline.gathers_as_all_reduce(program) == 1


def test_a_group_on_one_torus_axis_uses_two_ports_and_one_across_slices_uses_dcn():
  dev = lambda c, s=0: types.SimpleNamespace(coords=c, slice_index=s)  # noqa: E731
  links = roofline.Links.of([dev((x, y, 0), s) for s in (0, 1) for y in (0, 1) for x in (0, 1)])
  assert links.span([0, 1]) == (1, False)  # x differs
  assert links.span([0, 1, 2, 3]) == (2, False)
  assert links.span([0, 4]) == (0, True)
  hlo = LOOP_HLO.replace("replica_groups=[2,4]<=[8]", "replica_groups={{0,1},{2,3},{4,5},{6,7}}")
  chip = roofline.Chip("x", None, 1e12, hbm_bw=1e11, ici_bw=1.2e12, ici_ports=6, dcn_bw=1e9)
  t = roofline.analyse(roofline.parse(hlo), chip, links)
  x = 4 * 256 * 4
  assert t.collectives["all-reduce"]["seconds"] == pytest.approx(
      3 * x / (2 * 1e11) + 2 * 7 / 8 * 64 * 256 * 4 / 1e9)  # last one spans both slices
  assert t.dcn_bytes == pytest.approx(2 * 7 / 8 * 64 * 256 * 4)


def test_the_bound_is_the_slowest_resource_and_mfu_follows_it():
  t = roofline.Totals(hbm_bytes=2e9, ici_seconds=0.001)
  chip = roofline.Chip("x", None, 1e12, hbm_bw=1e12)
  p = roofline.predict(flops=1e9, model_flops=5e8, totals=t, chip=chip)
  assert p["bound"] == "hbm" and p["step_s"] == pytest.approx(2e-3)
  assert p["mfu"] == pytest.approx(5e8 / (2e-3 * 1e12))
  p = roofline.predict(flops=1e10, model_flops=5e9, totals=t, chip=chip)
  assert p["bound"] == "compute" and p["mfu"] == pytest.approx(0.5)
  assert roofline.predict(1e9, 1e9, t, roofline.Chip("cpu", None, None))["step_s"] is None


def test_hbm_bytes_of_a_compiled_step_match_xla_with_loops_counted_once():
  """On a scanned stack's train step compiled for this CPU: XLA's cost
  analysis (which counts a loop body once) and ours with loops=False agree;
  with loops counted by their trips ours is larger."""
  from mmjax.models import layers
  x = jnp.ones((4, 16, 32))
  m = layers.Stack(depth=3, block_kwargs=dict(num_heads=2, head_dim=16, mlp_dim=64), scan=True,
                   remat="none")
  params = m.init(jax.random.key(0), x)
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - g, p,
                                        jax.grad(lambda q: (m.apply(q, x)[0] ** 2).sum())(p)))
  compiled = step.lower(params).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  program = roofline.parse(compiled.as_text())
  once = roofline.analyse(program, roofline.Chip("cpu", None, None), loops=False).hbm_bytes
  assert once == pytest.approx(cost["bytes accessed"], rel=1e-3)
  loops = [i for c in program.computations.values() for i in c if i.op == "while"]
  assert loops and all(roofline.trip_count(program, i) == 3 for i in loops)
  assert roofline.analyse(program, roofline.Chip("cpu", None, None)).hbm_bytes > 1.5 * once


def test_a_multi_output_fusion_updating_buffers_in_place_writes_only_the_updates():
  hlo = """\
%fused (p0: f32[8,1024], p1: f32[8,1024], p2: f32[1,1024], p3: s32[]) -> (f32[8,1024], f32[8,1024]) {
  %p0 = f32[8,1024]{1,0} parameter(0)
  %p1 = f32[8,1024]{1,0} parameter(1)
  %p2 = f32[1,1024]{1,0} parameter(2)
  %p3 = s32[] parameter(3)
  %z = s32[] constant(0)
  %a = f32[8,1024]{1,0} dynamic-update-slice(%p0, %p2, %p3, %z)
  %n = f32[1,1024]{1,0} negate(%p2)
  ROOT %t = (f32[8,1024]{1,0}, f32[8,1024]{1,0}) tuple(%a, %b)
  %b = f32[8,1024]{1,0} dynamic-update-slice(%p1, %n, %p3, %z)
}

ENTRY %main (x: f32[8,1024], y: f32[8,1024], u: f32[1,1024], i: s32[]) -> (f32[8,1024], f32[8,1024]) {
  %x = f32[8,1024]{1,0} parameter(0)
  %y = f32[8,1024]{1,0} parameter(1)
  %u = f32[1,1024]{1,0} parameter(2)
  %i = s32[] parameter(3)
  ROOT %f = (f32[8,1024]{1,0}, f32[8,1024]{1,0}) fusion(%x, %y, %u, %i), kind=kLoop, calls=%fused
}
"""
  t = roofline.analyse(roofline.parse(hlo), roofline.Chip("cpu", None, None))
  # Reads the update and the index, writes two rows; the [8, 1024] buffers stay put.
  assert t.hbm_bytes == 1024 * 4 + 4 + 2 * 1024 * 4
