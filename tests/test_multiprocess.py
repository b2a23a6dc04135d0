"""Several JAX processes on this machine (launch/multiprocess_local.sh): the same
run on 2 processes x 4 CPU devices and on 1 process x 8 devices gives the same
losses, and the 2-process checkpoint restores in one process."""

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from experiments import clip_shapes
from mmjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny CLIP, FSDP over all 8 devices, read as 8 data shards so that the global
# batch is the same for 1 and 2 processes (loop.train_data).
OVERRIDES = {
    "model.vision.variant": "tiny/8", "model.text.size": "tiny", "model.embed_dim": 16,
    "batch_size": 16, "data.builder_kwargs.num_train": 160,
    "data.builder_kwargs.num_validation": 40, "data.builder_kwargs.num_test": 40,
    "log_every": 1, "checkpoint_every": 2, "eval_every": 0, "total_steps": 4,
    "mesh.preset": "fsdp", "data_shards": 8, "async_checkpoints": False,
}
CONFIG = "experiments/clip_shapes.py:runlocal=true"


def _flags(workdir):
  return [f"--config={CONFIG}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def _config(data_dir):
  c = clip_shapes.get_config("runlocal=true")
  for key, value in OVERRIDES.items():
    *parents, last = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  c.data.data_dir = data_dir
  return c


def _env(data_dir, **extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(MMJAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", PYTHON=sys.executable, **extra)
  return env


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
  data_dir = str(tmp_path / "tfds")
  two, one, logs = (str(tmp_path / n) for n in ("two", "one", "logs"))
  loop.tasks.build_task(_config(data_dir))  # prepares the dataset once, before the processes
  # Both runs at once: the 1-process one through launch/local.sh with 8 fake devices.
  ref = subprocess.Popen(["launch/local.sh", *_flags(one)], cwd=ROOT,
                         env=_env(data_dir, DEVICES="8"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  multi = subprocess.run(["launch/multiprocess_local.sh", "2", "4", *_flags(two)], cwd=ROOT,
                         env=_env(data_dir, MMJAX_LOG_DIR=logs), capture_output=True, text=True,
                         timeout=420)
  _, ref_err = ref.communicate(timeout=420)
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert ref.returncode == 0, ref_err[-3000:]

  # Process 0 alone wrote the metrics: one row per step; both processes logged.
  rows_two, rows_one = _rows(two), _rows(one)
  assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
  assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]
  for a, b in zip(rows_one, rows_two):
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-5, atol=1e-5,
                               err_msg=f"step {a['step']}")

  # Step 4 of the 2-process run, restored here (1 process, 8 devices): the same
  # params as the 1-process run, and a data state that continues its batches.
  config = _config(data_dir)
  restored = {}
  for name, workdir in (("two", two), ("one", one)):
    s = loop.setup(config, workdir)
    state, data_state = s["ckpt"].restore(loop.restore_target(s["abstract"], s["shardings"]), 4)
    s["ckpt"].close()
    data = loop.train_data(s["task"], config)
    data.set_state(data_state)
    restored[name] = (jax.device_get(state.params), next(data))
    data.close()
  chex.assert_trees_all_close(restored["two"][0], restored["one"][0], rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_equal(restored["two"][1], restored["one"][1])


def _free_slurm_job_id():
  """A job id whose coordinator port (61440 + id % 4096, as JAX picks it) is free."""
  for job in np.random.default_rng().permutation(4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + int(job)))
      except OSError:
        continue
    return str(int(job))
  raise RuntimeError("no free port in 61440..65535")


_PROBE = ("from mmjax import distributed; import jax; distributed.maybe_initialize(); "
          "print('rank', jax.process_index(), 'of', jax.process_count(), 'devices', "
          "jax.device_count(), flush=True)")


def test_slurm_variables_start_jax_distributed(tmp_path):
  """What srun sets for 2 tasks on one node: mmjax.distributed starts JAX's runtime."""
  job = _free_slurm_job_id()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _PROBE], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=_env(str(tmp_path), SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost",
                          SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                          XLA_FLAGS="--xla_force_host_platform_device_count=2"))
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for i, (out, err) in enumerate(outs):
    assert f"rank {i} of 2 devices 4" in out, err[-2000:]


def test_launcher_stops_every_process_when_one_fails(tmp_path):
  logs = tmp_path / "logs"
  out = subprocess.run(["launch/multiprocess_local.sh", "2", "1", "--config=missing.py",
                        f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                       text=True, env=_env(str(tmp_path), MMJAX_LOG_DIR=str(logs)), timeout=120)
  assert out.returncode != 0
  assert "exited with status" in out.stderr and "stopping the others" in out.stderr
  assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]
