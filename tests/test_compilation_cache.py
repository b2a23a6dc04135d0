"""mmjax.compilation_cache: which folder a setting names, and a second process
loading what the first compiled instead of compiling it again."""

import json
import os
import subprocess
import sys

import pytest

from mmjax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_setting_names_a_folder_or_turns_the_cache_off(tmp_path):
  env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
  assert compilation_cache.resolve(None, env) is None  # off unless asked for
  for off in ("off", "0", "false", "", " OFF "):
    assert compilation_cache.resolve(off, env) is None
  for on in ("on", "1", "true"):
    assert compilation_cache.resolve(on, env) == str(tmp_path / "xdg" / "mmjax" / "jax")
  assert compilation_cache.resolve(None, {**env, compilation_cache.ENV: "on"}) == str(
      tmp_path / "xdg" / "mmjax" / "jax")
  assert compilation_cache.resolve(str(tmp_path / "c"), env) == str(tmp_path / "c")
  # the flag's value wins over the variable
  assert compilation_cache.resolve("off", {compilation_cache.ENV: str(tmp_path)}) is None


def test_the_default_folder_is_outside_the_work_tree(monkeypatch, tmp_path):
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compilation_cache.default_dir() == str(tmp_path / ".cache" / "mmjax" / "jax")
  assert not compilation_cache.default_dir().startswith(ROOT)


def test_the_host_tag_names_the_machine_and_its_cpu(monkeypatch):
  tag = compilation_cache.host_tag()
  assert tag == compilation_cache.host_tag() and "/" not in tag
  monkeypatch.setattr(compilation_cache.platform, "processor", lambda: "another cpu")
  assert compilation_cache.host_tag() != tag


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(OSError, match=r"compilation cache folder .*file/cache"):
    compilation_cache.enable(str(blocker / "cache"))


# Compiles a program that takes longer than MIN_COMPILE_SECONDS (20 unrolled
# layers); prints whether it came from the persistent cache. The folder comes
# from --compilation_cache (argv[1], through mmjax.cli) or the environment.
_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from absl import flags
from mmjax import cli
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
flags.FLAGS(["probe", *sys.argv[1:]])
cli.init_process()

def net(x):
  for i in range(20):
    x = jnp.tanh(x @ x.T + i) * jnp.sin(x)
  return x.sum()

value = jax.jit(jax.grad(net))(jnp.ones((16, 16)) / 16).sum()
print(json.dumps({"hits": len(hits), "value": float(value)}))
"""


def _probe(args, env):
  out = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != compilation_cache.ENV}
  env.update(JAX_PLATFORMS="cpu")
  off = _probe([], env)  # no flag, no variable: no cache
  assert off["hits"] == 0 and not cache.exists()
  first = _probe([f"--compilation_cache={cache}"], env)
  # Entries go to this kind of host's subfolder (XLA:CPU compiles for its CPU).
  assert first["hits"] == 0 and os.listdir(cache) == [compilation_cache.host_tag()]
  assert os.listdir(cache / compilation_cache.host_tag())
  second = _probe([], {**env, compilation_cache.ENV: str(cache)})
  assert second["hits"] >= 1
  assert second["value"] == first["value"] == off["value"]


_MULTI = """
import jax
from absl import flags
from mmjax import cli, compilation_cache
flags.FLAGS(["probe"])
cli.init_process()
print("processes", jax.process_count(), "cache", jax.config.jax_compilation_cache_dir)
"""


def test_it_stays_off_when_several_processes_run(tmp_path):
  """Processes sharing the folder could mix loaded and compiled programs, whose
  collectives never meet: with jax.distributed up, the cache stays off."""
  from multihost_cases import free_port
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", MMJAX_COORDINATOR=f"127.0.0.1:{port}",
             MMJAX_NUM_PROCESSES="2", **{compilation_cache.ENV: str(tmp_path / "cache")})
  procs = [subprocess.Popen([sys.executable, "-c", _MULTI], cwd=ROOT, text=True,
                            env={**env, "MMJAX_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "processes 2 cache None" in out, out
  assert not (tmp_path / "cache").exists()
