"""What a run survives: kill -9 at any moment (mid-step, mid-async-save), torn
checkpoints, a lost peer process, and a save that runs out of disk space."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import multihost_cases
from mmjax import checkpoint
from mmjax.train import loop, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny CLIP on the shapes scenes (the "clip" family of tests/multihost_cases.py).
FLAGS = {"model.vision.variant": "tiny/8", "model.text.size": "tiny", "model.embed_dim": 16,
         "batch_size": 16, "data.builder_kwargs.num_train": 160,
         "data.builder_kwargs.num_validation": 40, "data.builder_kwargs.num_test": 40,
         "log_every": 1, "checkpoint_every": 2, "eval_every": 0, "keep_checkpoints": 3}


def _command(launcher, workdir, **overrides):
  flags = {**FLAGS, **overrides}
  return [*launcher, "--config=experiments/clip_shapes.py:runlocal=true", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in flags.items())]


def _env(data_dir=None, **extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, **extra)
  if data_dir:  # the TFDS folder of tests/multihost_cases.py's family_config
    env["MMJAX_DATA_DIR"] = os.path.join(data_dir, "tfds")
  return env


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("faults_data"))
  tasks.build_task(multihost_cases.family_config("clip", root))  # prepares the scenes once
  return root


def _wait_for(ready, proc, what: str, timeout: float = 300.0, poll: float = 0.002):
  start = time.monotonic()
  while not ready():
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
    assert time.monotonic() - start < timeout, f"no {what} within {timeout} s"
    time.sleep(poll)


def _saves(ckpt_dir) -> set[tuple[str, int]]:
  """(name, inode) of the temporary folders of saves in progress (or torn)."""
  if not os.path.isdir(ckpt_dir):
    return set()
  out = set()
  for name in os.listdir(ckpt_dir):
    if ".orbax-checkpoint-tmp" in name:
      try:
        out.add((name, os.stat(os.path.join(ckpt_dir, name)).st_ino))
      except FileNotFoundError:  # renamed as we looked: that save just finished
        pass
  return out


def _complete_steps(ckpt_dir) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(
      ckpt_dir) else []


@pytest.mark.slow
def test_kill_9_at_any_moment_resumes_to_the_uninterrupted_run(data_dir, tmp_path):
  """Three SIGKILLs (mid-step, mid-async-save, just after a resume), then two
  damaged checkpoints: the same command ends at the uninterrupted run's loss."""
  steps = 16
  launcher = ["launch/local.sh"]
  env = _env(data_dir, DEVICES="2")
  ref = subprocess.run(_command(launcher, tmp_path / "ref", total_steps=steps),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  workdir = tmp_path / "run"
  ckpt_dir = str(workdir / "checkpoints")
  command = _command(launcher, workdir, total_steps=steps)
  log = open(tmp_path / "run.log", "w")
  rng = random.Random(0)

  def start():
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

  def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

  # 1. mid-step: at a random moment once a checkpoint is complete.
  proc = start()
  _wait_for(lambda: _complete_steps(ckpt_dir), proc, "a complete checkpoint")
  time.sleep(rng.uniform(0.0, 0.3))
  kill(proc)
  # 2. mid-async-save: the moment a new save's temporary folder appears
  #    (again at the next start should that save finish before the signal lands).
  for _ in range(3):
    before = _saves(ckpt_dir)
    proc = start()
    _wait_for(lambda: _saves(ckpt_dir) - before, proc, "an async save")
    kill(proc)
    torn = _saves(ckpt_dir) - before
    if torn:
      break
  assert torn, "no kill landed inside an async save in 3 tries"
  # 3. soon after a resume, at a random moment.
  resumes = lambda: open(tmp_path / "run.log").read().count("resumed from")  # noqa: E731
  seen = resumes()
  proc = start()
  _wait_for(lambda: resumes() > seen, proc, "a resume", poll=0.05)
  time.sleep(rng.uniform(0.0, 1.0))
  kill(proc)

  # Two damaged checkpoints newer than every real one: one missing its metadata
  # (a copy cut short), one whose array files are truncated (unreadable data).
  newest = _complete_steps(ckpt_dir)[-1]
  for step, damage in ((newest + 1, "metadata"), (newest + 3, "data")):
    # odd steps: the run (checkpoint_every=2) never saves them itself
    target = os.path.join(ckpt_dir, str(step))
    shutil.copytree(os.path.join(ckpt_dir, str(newest)), target)
    if damage == "metadata":
      os.remove(os.path.join(target, "state", "_METADATA"))
    else:
      for folder, _, files in os.walk(os.path.join(target, "state")):
        if os.path.basename(folder) == "d":
          for name in files:
            with open(os.path.join(folder, name), "r+b") as f:
              f.truncate(max(os.path.getsize(f.name) // 2, 1))

  final = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  for step in (newest + 1, newest + 3):
    assert re.search(rf"checkpoint {re.escape(ckpt_dir)}/{step} (is incomplete|cannot be read)",
                     final.stderr), f"no warning naming step {step}"
  rows, ref_rows = _rows(workdir), _rows(tmp_path / "ref")
  assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step once
  np.testing.assert_allclose(rows[-1]["train/loss"], ref_rows[-1]["train/loss"], rtol=1e-6,
                             atol=1e-6)
  set_aside = os.listdir(ckpt_dir + ".torn")
  assert {n.split(".")[0] for n in set_aside} >= {str(newest + 1), str(newest + 3)}


def _pid_of(process_id: int, log_dir: str) -> int | None:
  """The pid of the launcher's process `process_id` (found by its environment)."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
      continue
    if (env.get(b"MMJAX_PROCESS_ID") == str(process_id).encode()
        and env.get(b"MMJAX_LOG_DIR") == log_dir.encode()
        and b"python" in open(f"/proc/{pid}/cmdline", "rb").read()):
      return int(pid)
  return None


@pytest.mark.slow
def test_a_killed_peer_stops_the_run_which_then_resumes(data_dir, tmp_path):
  """kill -9 of process 1 of 2: the launcher exits with that status within
  bounded time, naming the process; the same command then resumes on both."""
  logs = str(tmp_path / "logs")
  workdir = tmp_path / "run"
  command = _command(["launch/multiprocess_local.sh", "2", "1"], workdir, total_steps=24,
                     **{"mesh.preset": "fsdp"})
  env = _env(data_dir, MMJAX_LOG_DIR=logs, MMJAX_STOP_GRACE="10", MMJAX_HEARTBEAT_TIMEOUT="10")
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  # A finished checkpoint first (the async save of step 2 can still be in
  # flight at step 3 on a loaded machine): the resumed run must find one.
  ckpts = workdir / "checkpoints"
  _wait_for(lambda: len(_rows(workdir)) >= 3 and ckpts.is_dir() and any(
      n.isdigit() for n in os.listdir(ckpts)), proc, "3 logged steps and a checkpoint", poll=0.05)
  peer = _pid_of(1, logs)
  assert peer is not None
  os.kill(peer, signal.SIGKILL)
  killed = time.monotonic()
  _, err = proc.communicate(timeout=120)
  assert time.monotonic() - killed < 60
  assert proc.returncode == 128 + signal.SIGKILL
  assert "process 1 exited with status 137 (killed by SIGKILL)" in err

  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in open(os.path.join(logs, "process_0.log")).read()
  assert _rows(workdir)[-1]["step"] == 24


_PEER = """
import os, signal, sys, time
import numpy as np
from jax.experimental import multihost_utils
from mmjax import distributed
distributed.maybe_initialize()
for i in range(10000):
  multihost_utils.process_allgather(np.array([i]))
  if i == 2 and os.environ["MMJAX_PROCESS_ID"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(0.1)
"""


def test_without_a_launcher_the_survivor_exits_naming_the_lost_peer(tmp_path):
  """On a pod no launcher stops the others: JAX's coordination service does,
  after MMJAX_HEARTBEAT_TIMEOUT seconds without the dead peer's heartbeats."""
  port = multihost_cases.free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _PEER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=_env(MMJAX_COORDINATOR=f"127.0.0.1:{port}", MMJAX_NUM_PROCESSES="2",
                          MMJAX_PROCESS_ID=str(i), MMJAX_HEARTBEAT_TIMEOUT="5"))
           for i in range(2)]
  procs[1].wait(timeout=120)
  died = time.monotonic()
  _, err = procs[0].communicate(timeout=120)
  assert procs[1].returncode == -signal.SIGKILL
  assert procs[0].returncode != 0
  assert time.monotonic() - died < 60
  assert re.search(r"[Tt]ask 1 heartbeat timeout", err), err[-2000:]


def test_a_save_without_disk_space_fails_clearly_and_keeps_the_last_checkpoint(
    data_dir, tmp_path, monkeypatch):
  """The second save hits ENOSPC: a CheckpointSaveError names the step, the
  folder and the newest complete step, which restores; with space back, the
  same run resumes from it."""
  config = multihost_cases.family_config("clip", data_dir)
  config.total_steps, config.checkpoint_every, config.eval_every = 4, 2, 0
  config.data_shards = 0
  workdir = str(tmp_path / "run")
  real = ocp.StandardCheckpointHandler.async_save
  calls = []

  def no_space(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", no_space)
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r"step 4 .*No space left on device.*step 2 is the newest complete"):
    loop.train(config, workdir)
  monkeypatch.undo()
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 2
  ckpt.close()
  out = loop.train(config, workdir)
  assert out["step"] == 4
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4]
