"""Several JAX processes on this machine (launch/multiprocess_local.sh): every
Task on every mesh trains, evaluates and checkpoints on 2 processes x 4 CPU
devices as on 1 process x 8 devices, and the 2-process workdirs restore in one
process (tests/multihost_cases.py holds the cases)."""

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import multihost_cases
from mmjax.train import loop, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = list(multihost_cases.CASES)


def _env(data_dir, **extra):
  # No persistent compilation cache: the 2-process runs never use one, and the
  # 1-process reference compiles its programs as they do.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(MMJAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             MMJAX_COMPILATION_CACHE="off", **extra)
  return env


def _stderr_tail(stderr: str, limit: int = 4000) -> str:
  """The end of a process's stderr, without the list of extension modules that
  Python's fatal-error handler prints after the stacks."""
  cut = stderr.rfind("\nExtension modules:")
  return (stderr if cut == -1 else stderr[:cut])[-limit:]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
  """Every case of tests/multihost_cases.py run on 2 processes x 4 devices
  (launch/multiprocess_local.sh) and, at the same time, on 1 process x 8
  devices (launch/local.sh)."""
  root = tmp_path_factory.mktemp("matrix")
  data = str(root / "data")
  for case in CASES:  # prepares every dataset once, before the processes start
    tasks.build_task(multihost_cases.case_config(case, data))
  args = [f"--data_dir={data}", f"--cases={','.join(CASES)}"]
  env = dict(MMJAX_MODULE="tests.multihost_cases")
  ref = subprocess.Popen(["launch/local.sh", *args, f"--out={root / 'one'}"], cwd=ROOT,
                         env=_env(data, DEVICES="8", **env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  multi = subprocess.run(["launch/multiprocess_local.sh", "2", "4", *args,
                          f"--out={root / 'two'}"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(data, MMJAX_LOG_DIR=str(root / "logs"), **env), timeout=1800)
  _, ref_err = ref.communicate(timeout=1800)
  assert multi.returncode == 0, _stderr_tail(multi.stderr)
  assert ref.returncode == 0, _stderr_tail(ref_err)
  assert sorted(os.listdir(root / "logs")) == ["process_0.log", "process_1.log"]
  return {"root": root, "data": data}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_and_evaluate_as_one(matrix, case):
  """The same losses at every step and the same eval metrics; the checkpoint
  restored on the same 2 processes holds the 1-process run's params, and
  mmjax.evaluate there (EVALUATED cases) gives the metrics of training."""
  two, one = (matrix["root"] / n / case for n in ("two", "one"))
  rows_two, rows_one = _rows(two), _rows(one)
  steps = list(range(1, multihost_cases.STEPS + 1))
  assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == steps
  for a, b in zip(rows_one, rows_two):
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-5, atol=1e-5,
                               err_msg=f"{case} step {a['step']}")
  final_one = {k: v for k, v in rows_one[-1].items() if k.startswith("eval/")}
  final_two = {k: v for k, v in rows_two[-1].items() if k.startswith("eval/")}
  assert final_one and set(final_two) == set(final_one)
  for key, value in final_one.items():
    np.testing.assert_allclose(final_two[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  # Restored on the same processes: the params of the 1-process run's checkpoint.
  restored = {n: json.load(open(matrix["root"] / n / case / "restored.json"))
              for n in ("two", "one")}
  assert restored["two"]["step"] == restored["one"]["step"] == multihost_cases.STEPS
  assert set(restored["two"]["sum_of_squares"]) == set(restored["one"]["sum_of_squares"])
  for key, value in restored["one"]["sum_of_squares"].items():
    np.testing.assert_allclose(restored["two"]["sum_of_squares"][key], value, rtol=1e-4,
                               atol=1e-8, err_msg=key)
  if case in multihost_cases.EVALUATED:  # mmjax.evaluate's restore and evaluation
    evaluated = json.load(open(two / "eval.json"))
    assert evaluated["step"] == multihost_cases.STEPS
    for key, value in final_two.items():
      np.testing.assert_allclose(evaluated[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_process_checkpoint_restores_in_one_process(matrix, case):
  """Step 4 of the 2-process run, restored here (1 process, 8 devices): the
  params of the 1-process run, and a data state that continues its batches."""
  config = multihost_cases.case_config(case, matrix["data"])
  restored = {}
  for name in ("two", "one"):
    s = loop.setup(config, str(matrix["root"] / name / case))
    step = s["ckpt"].latest_step()
    assert step == multihost_cases.STEPS
    state, data_state = s["ckpt"].restore(loop.restore_target(s["abstract"], s["shardings"]),
                                          step)
    s["ckpt"].close()
    data = loop.train_data(s["task"], config)
    data.set_state(data_state)
    restored[name] = (jax.device_get(state.params), next(data))
    if hasattr(data, "close"):
      data.close()
  chex.assert_trees_all_close(restored["two"][0], restored["one"][0], rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_equal(restored["two"][1], restored["one"][1])


@pytest.mark.slow
def test_embed_and_chat_read_a_two_process_workdir(matrix):
  from mmjax import chat, embed
  root = matrix["root"]
  image = os.path.join(matrix["data"], "instruct", "images", "eval", "000000.png")
  texts = ["a red circle", "two blue squares"]
  out = {n: embed.embed(str(root / n / "clip_softmax"), images=[image], texts=texts)
         for n in ("two", "one")}
  for key in ("image_embeds", "text_embeds"):
    np.testing.assert_allclose(out["two"][key], out["one"][key], rtol=1e-4, atol=1e-5)
  answers = {n: chat.answer_once(str(root / n / "llava_stage2"), image, "What color is the "
                                 "circle?", max_new_tokens=4) for n in ("two", "one")}
  assert answers["two"] == answers["one"]


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
