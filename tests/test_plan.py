"""mmjax.plan: reading a compiled program, a CPU plan in this process, and the
command line against a (small) TPU topology compiled on this CPU."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from experiments import clip_shapes
from mmjax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """\
%all-reduce-scatter.10 (input.10: f32[128,64]) -> f32[32,64] {
  %input.10 = f32[128,64]{1,0:T(8,128)} parameter(0)
  %all-reduce.138 = f32[128,64]{1,0:T(8,128)} all-reduce(%input.10), channel_id=125
  ROOT %dynamic-slice.256 = f32[32,64]{1,0:T(8,128)} dynamic-slice(%all-reduce.138, %m, %c)
}

ENTRY %main.1 (p0: bf16[4,256]) -> f32[] {
  %all-gather.1 = bf16[16,256]{1,0:T(8,128)(2,1)} all-gather(%p0), dimensions={0}
  %ag-start = (bf16[4,256]{1,0}, bf16[16,256]{1,0}) all-gather-start(%p0), dimensions={0}
  %ag-done = bf16[16,256]{1,0} all-gather-done(%ag-start)
  %fusion.14 = f32[32,64]{1,0:T(8,128)} fusion(%fusion.439), kind=kCustom, calls=%all-reduce-scatter.10
  %cp = f32[8,16]{1,0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}
  %logits = f32[512,512]{1,0} dot(%a, %b)
  %bad = f32[1,512,512]{2,1,0} copy(%logits)
}
"""


def test_collectives_are_counted_once_each_and_fused_ones_by_their_kind():
  c = plan.collectives(HLO)
  assert c["all-gather"]["count"] == 2 and c["all-gather"]["largest_bytes"] == 16 * 256 * 2
  assert c["reduce-scatter"]["count"] == 1
  assert c["reduce-scatter"]["largest_bytes"] == 32 * 128 * 4  # f32[32,64] in (8, 128) tiles
  assert c["all-reduce"]["count"] == 0  # the one inside the reduce-scatter fusion
  assert c["collective-permute"]["count"] == 1 and c["all-to-all"]["count"] == 0


def test_square_buffers_and_largest_buffers():
  assert plan.square_buffers(HLO, 512) == ["f32[1,512,512]", "f32[512,512]"]
  assert plan.square_buffers(HLO, 256) == []
  assert plan.largest_buffers(HLO, 1) == [{"shape": "f32[512,512]", "bytes": 512 * 512 * 4}]


def test_accelerator_type_counts_cores_where_the_chip_has_two():
  assert plan._accelerator_type("v5p:4x4x4", "v5p") == "v5p-128"
  assert plan._accelerator_type("v5e:4x4", "v5e") == "v5e-16"


def test_jaxpr_flops_count_scanned_layers_and_remat():
  """A scanned stack counts as the unrolled one; remat's recomputation adds
  forward work; a conv counts its kernel per output feature."""
  import jax.numpy as jnp
  from mmjax.models import layers
  x = jnp.ones((4, 16, 16))

  def step_flops(scan, remat):
    m = layers.Stack(depth=3, block_kwargs=dict(num_heads=2, head_dim=8, mlp_dim=64), scan=scan,
                     remat=remat)
    params = m.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p: m.apply(p, x)[0].sum()))
    return plan.jaxpr_flops(grad.trace(params).jaxpr.jaxpr)

  plain = step_flops(True, "none")
  # One block's matmuls, forward: q/k/v/out 4*(2*64*16*16), scores and sum
  # 2*(2*4*2*16*16*8), the MLP 2*(2*64*16*64); the backward twice that.
  forward = 4 * 2 * 64 * 16 * 16 + 2 * 2 * 4 * 2 * 16 * 16 * 8 + 2 * 2 * 64 * 16 * 64
  assert plain == step_flops(False, "none") == 3 * 3 * forward
  assert step_flops(True, "full") > step_flops(True, "save_attention") > plain
  conv = jax.make_jaxpr(lambda a, k: jax.lax.conv_general_dilated(
      a, k, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))(
          jnp.ones((2, 32, 32, 3)), jnp.ones((4, 4, 3, 64)))
  assert plan.jaxpr_flops(conv.jaxpr) == 2 * (2 * 8 * 8 * 64) * (4 * 4 * 3)
  # A Pallas kernel (splash attention, interpret mode here) counts its body per grid step:
  # the same matmuls as the plain form, forward and backward.
  from mmjax.models import attention
  q = jnp.ones((2, 256, 4, 64))
  for impl in ("cpu", "splash"):
    f = lambda q, impl=impl: attention.dot_product_attention(q, q, q, None, impl)  # noqa: E731
    assert plan.jaxpr_flops(jax.make_jaxpr(f)(q).jaxpr) == 4 * 2 * 4 * 256 * 256 * 64
  # A shard_map's body is one shard's work, done by every shard.
  from jax.sharding import Mesh, PartitionSpec as P
  import numpy as np
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("d", "e"))
  sharded = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()),
                          out_specs=P("d"))
  assert plan.jaxpr_flops(jax.make_jaxpr(sharded)(jnp.ones((8, 16)), jnp.ones((16, 32))).jaxpr) \
      == 2 * 8 * 16 * 32 * 2  # 4 shards of [4, 16] @ [16, 32]: the product twice (e replicates)


def _tiny(**overrides):
  c = clip_shapes.get_config("runlocal=true")
  c.model.vision.variant, c.model.text.size, c.model.embed_dim = "tiny/8", "tiny", 16
  c.model.text.vocab_size = 64
  c.data.context_length = 16
  c.batch_size = 40  # no model dim is 40, so a [40, 40] buffer can only be logits
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c


@pytest.mark.slow
def test_cpu_plan_of_the_chunked_loss_has_no_batch_by_batch_buffer():
  config = _tiny(**{"mesh.preset": "fsdp", "model.chunked_loss": True})
  report = plan.plan(config, jax.devices(), plan.Chip("cpu", 1 << 30, None))
  assert report["fits"] is True and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert report["batch_x_batch_buffers"] == []
  assert report["collectives"]["collective-permute"]["count"] > 0
  pc = report["per_chip_bytes"]
  assert 0 < pc["params"] < 4 * report["params"]  # sharded: under one float32 copy
  assert pc["total"] >= pc["temporaries"] and report["model_flops_per_chip"] > 0
  assert "B x B (40 x 40) buffers on one chip: none" in plan.format_report(report)
  # No remat: the step's matmuls are the model's count (6N and attention).
  model = report["model_flops_per_chip"]
  assert 0.95 * model <= report["step_flops_per_chip"] <= 1.1 * model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e '.[tpu-plan]')")
def test_tpu_topology_plan_runs_here_and_fails_when_it_does_not_fit(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "mmjax.plan", "--config=experiments/clip_shapes.py:runlocal=true",
         "--topology=v5p:2x2x1", "--config.mesh.preset=fsdp", "--hbm_gib=0.01",
         "--config.model.vision.variant=tiny/8", "--config.model.text.size=tiny",
         "--config.model.embed_dim=16", "--config.model.text.vocab_size=64",
         f"--json={tmp_path / 'plan.json'}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "(4 chips)" in out.stdout and "DOES NOT FIT" in out.stdout
  assert "{'data': 1, 'fsdp': 4, 'tensor': 1}" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e '.[tpu-plan]')")
def test_the_flagship_l14_step_fits_a_v5p_64_with_room(tmp_path):
  """CLIP ViT-L/14 at batch 32768 on v5p:4x4x4 (512 pairs per chip), compiled
  for the chips with the remat policy its config names: at most 80% of HBM,
  attention in splash kernels, and a roofline."""
  import json
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  path = tmp_path / "plan.json"
  cmd = [sys.executable, "-m", "mmjax.plan", "--config=experiments/clip_vit_l14.py",
         "--config.batch_size=32768", "--topology=v5p:4x4x4", f"--json={path}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  report = json.loads(path.read_text())
  assert report["devices"] == 64 and report["global_batch"] == 32768
  share = report["per_chip_bytes"]["total"] / report["hbm_bytes"]
  assert report["fits"] and share <= 0.8, f"{share:.0%} of HBM per chip"
  assert report["memory"]["share"] == pytest.approx(share)
  # The roofline: every bound positive, the step at least the compute bound.
  p = report["predicted"]
  assert p["bound"] in ("compute", "hbm", "ici") and p["bound"] == max(p["seconds"],
                                                                        key=p["seconds"].get)
  assert p["step_s"] >= p["seconds"]["compute"] > 0 and 0 < p["mfu"] < 1
  assert p["loops_of_unknown_length"] == 0
  assert report["collectives"]["all-reduce"]["executed"] >= report["collectives"]["all-reduce"][
      "count"] > 0
  # Attention runs as splash kernels: no [..., 257, 257] scores among the largest buffers.
  kernels = report["attention_kernels"]
  assert any("splash_mha_fwd" in k for k in kernels) and any("splash_mha_dq" in k for k in kernels)
  assert not [b for b in report["largest_buffers"] if b["shape"].endswith(",257,257]")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e '.[tpu-plan]')")
def test_sweep_plans_each_mesh_and_ranks_them_by_predicted_mfu(tmp_path):
  import json
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  path = tmp_path / "sweep.json"
  cmd = [sys.executable, "-m", "mmjax.plan", "--config=experiments/clip_shapes.py:runlocal=true",
         "--topology=v5p:2x2x2", "--sweep", "--config.model.vision.variant=tiny/8",
         "--config.model.text.size=tiny", "--config.model.embed_dim=16",
         "--config.model.text.vocab_size=64", f"--json={path}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  rows = json.loads(path.read_text())["sweep"]
  assert [r["mesh_name"] for r in rows if "error" not in r] and {r["mesh_name"] for r in rows} == {
      "dp", "fsdp", "fsdp_tensor", "data2_fsdp4"}
  planned = [r for r in rows if "error" not in r]
  assert {r["mesh_name"]: r["mesh"] for r in planned}.get("data2_fsdp4", {"data": 2, "fsdp": 4,
                                                                          "tensor": 1}) == {
      "data": 2, "fsdp": 4, "tensor": 1}
  mfus = [r["predicted"]["mfu"] for r in planned]
  assert mfus == sorted(mfus, reverse=True) and all(0 < m < 1 for m in mfus)
  assert "best predicted MFU first" in out.stdout and rows[0]["mesh_name"] in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e '.[tpu-plan]')")
def test_llava_7b_stage_2_plans_with_splash_and_its_fsdp_collectives(tmp_path):
  """LLaVA-1.5-7B stage 2 on v5p:4x4x4 (fsdp=64): splash attention, no
  [2623, 2623] scores held, and the weights' gathers found and charged."""
  import json
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  path = tmp_path / "plan.json"
  cmd = [sys.executable, "-m", "mmjax.plan", "--config=experiments/llava15_7b.py:stage=2",
         "--topology=v5p:4x4x4", f"--json={path}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  report = json.loads(path.read_text())
  assert report["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1} and report["fits"]
  assert any("splash_mha_fwd" in k for k in report["attention_kernels"])
  assert not [b for b in report["largest_buffers"] if ",2623]" in b["shape"]
              or ",2688]" in b["shape"]]
  p = report["predicted"]
  assert p["seconds"]["ici"] > 0 and 0 < p["mfu"] < 1 and p["loops_of_unknown_length"] == 0
  moved = sum(c["traffic_bytes"] for c in report["collectives"].values())
  # A 64-way FSDP step gathers every weight it uses: each chip receives at
  # least 63/64 of the bf16 params once.
  assert moved >= 2 * report["params"] * 63 / 64
