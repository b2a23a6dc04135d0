"""The malloc tunables that `python -m mmjax.train` re-executes itself with."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mmjax import hostenv


def test_tuned_environ_adds_the_tunables_to_other_ones():
  env = hostenv.tuned_environ({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=8"})
  assert env["PATH"] == "/bin"
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.rtld.nns=8", *hostenv.MALLOC_TUNABLES]
  assert hostenv.tuned_environ({})["GLIBC_TUNABLES"] == ":".join(hostenv.MALLOC_TUNABLES)


@pytest.mark.parametrize("environ", [
    {hostenv.OPT_OUT: "1"},
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},  # the user's own choice
    {"GLIBC_TUNABLES": ":".join(hostenv.MALLOC_TUNABLES)},  # already re-executed
])
def test_tuned_environ_leaves_the_environment_alone(environ):
  assert hostenv.tuned_environ(environ) is None


# Allocates 256 MiB with malloc, touches it, frees it and prints how much of it
# the resident set kept; the re-execution happens first and prints the tunables.
_PROBE = textwrap.dedent("""
    import ctypes, os, sys
    from mmjax import hostenv
    hostenv.reexec_with_tuned_malloc()
    print(os.environ.get("GLIBC_TUNABLES", ""))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    def rss():
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    n = 256 << 20
    before = rss()
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
    print((rss() - before) / n)
""")


def _probe(**env_overrides):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split("\n")
  return out[0], float(out[1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's tunables exist on Linux with glibc only")
def test_the_reexecuted_process_keeps_freed_memory_for_the_next_step():
  tunables, kept = _probe()
  assert tunables == ":".join(hostenv.MALLOC_TUNABLES)
  assert kept > 0.9  # freed, still resident: the next step reuses it without page faults
  tunables, kept = _probe(**{hostenv.OPT_OUT: "1"})
  assert tunables == ""
  assert kept < 0.1  # glibc's default: an mmap'd block, returned to the kernel on free
