"""The train steps of CLIP, the LM and LLaVA compile on every mesh preset and
on data x fsdp and data x tensor meshes (8 fake devices) without XLA's
"Involuntary full rematerialization": a tensor the partitioner can only
reshard by replicating it, which on a pod is a whole tensor all-gathered per
step."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"dp": {"preset": "dp"}, "fsdp": {"preset": "fsdp"},
          "fsdp_tensor": {"preset": "fsdp_tensor", "tensor": 2},
          "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
          "data2_tensor4": {"data": 2, "fsdp": 1, "tensor": 4}}
CONFIGS = ("clip_shapes", "lm_shapes", "llava_shapes")
MARK = "=== case "

# Compiles each (config, mesh) with mmjax.plan on 8 fake CPU devices, the
# layers in their accelerator form, printing a marker to stderr before each,
# so that XLA's warnings (on stderr) can be told apart by case.
_SCRIPT = """
import importlib, json, sys
import jax
from mmjax import plan
cases = json.loads(sys.argv[1])
for name, mesh_name, mesh in cases:
  c = importlib.import_module(f"experiments.{name}").get_config("runlocal=true")
  model = c.model.llm if "llm" in c.model else c.model.text
  model.vocab_size = 64
  c.cpu_tuning = "false"
  c.mesh.preset = mesh.get("preset", "")
  for axis in ("data", "fsdp", "tensor"):
    if axis in mesh:
      c.mesh[axis] = mesh[axis]
  print(f"%s{name} {mesh_name}", file=sys.stderr, flush=True)
  report = plan.plan(c, jax.devices(), plan.Chip("cpu", None, None))
  print(f"compiled {name} {mesh_name} {report['mesh']}", flush=True)
""" % MARK


@pytest.mark.slow
def test_no_involuntary_rematerialization_on_any_mesh():
  import json
  cases = [(c, m, spec) for c in CONFIGS for m, spec in MESHES.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("compiled ") == len(cases), out.stdout
  found, case = [], None
  for line in out.stderr.splitlines():
    if line.startswith(MARK):
      case = line[len(MARK):]
    elif "Involuntary full rematerialization" in line:
      found.append(f"{case}: {line[line.find('HLO operation'):][:200]}")
  assert not found, "\n".join(found)
