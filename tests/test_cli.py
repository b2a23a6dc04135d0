"""The public command line, run as a user would: train, SIGTERM, restart, evaluate."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.model.vision.variant=tiny/8", "--config.model.text.size=tiny",
    "--config.model.embed_dim=16", "--config.batch_size=16", "--config.eval.batch_size=32",
    "--config.data.builder_kwargs.num_train=160", "--config.data.builder_kwargs.num_validation=40",
    "--config.data.builder_kwargs.num_test=40", "--config.log_every=1",
    "--config.checkpoint_every=100", "--config.eval_every=0", "--config.total_steps=30",
]


def _env(data_dir):
  env = dict(os.environ)
  env["MMJAX_DATA_DIR"] = data_dir
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user would have
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cmd(module, workdir, extra=()):
  return [sys.executable, "-m", module, "--config=experiments/clip_shapes.py:runlocal=true",
          f"--workdir={workdir}", *TINY, *extra]


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


@pytest.mark.slow
def test_sigterm_then_restart_matches_an_uninterrupted_run(tmp_path):
  data_dir = str(tmp_path / "tfds")
  env = _env(data_dir)
  straight = str(tmp_path / "straight")
  subprocess.run(_cmd("mmjax.train", straight), cwd=ROOT, env=env, check=True, timeout=600,
                 capture_output=True)

  resumed = str(tmp_path / "resumed")
  proc = subprocess.Popen(_cmd("mmjax.train", resumed), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not any(r["step"] >= 8 for r in _rows(resumed)):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  stopped_at = _rows(resumed)[-1]["step"]
  assert 8 <= stopped_at < 30
  assert os.path.isdir(os.path.join(resumed, "checkpoints", str(stopped_at)))

  subprocess.run(_cmd("mmjax.train", resumed), cwd=ROOT, env=env, check=True, timeout=600,
                 capture_output=True)
  a, b = _rows(straight)[-1], _rows(resumed)[-1]
  assert a["step"] == b["step"] == 30
  assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a["train/loss"], b["train/loss"])

  out = subprocess.run(_cmd("mmjax.evaluate", resumed), cwd=ROOT, env=env, check=True,
                       timeout=600, capture_output=True, text=True)
  with open(os.path.join(resumed, "eval.json")) as f:
    results = json.load(f)
  assert results["step"] == 30
  assert 0.0 <= results["eval/zeroshot_top1"] <= 1.0 and "eval/i2t_r1" in results
  assert '"eval/t2i_r5"' in out.stdout
