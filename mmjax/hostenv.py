"""The host's malloc for XLA's CPU runtime, set before the process starts.

XLA's CPU runtime takes a step's buffers (activations, gradients, the optimizer's
temporaries) from malloc and frees them when the step ends. glibc serves any
allocation above its mmap threshold (32 MiB at most) with fresh pages from the
kernel and gives them back on free, and the arenas of its worker threads trim
their heaps as well, so every step faults its working set in again, page by
page: minor page faults then take a large share of a CPU step's time
(docs/performance.md measures it).

`MALLOC_TUNABLES` keeps freed memory in the process for the next step: one
arena (the main heap), no mmap for large blocks, no trimming. The resident set
then stays at the run's peak instead of shrinking between steps. glibc reads
the tunables once, when the process starts, so a command line entry point calls
`reexec_with_tuned_malloc()` first: it replaces the process (same PID, same
arguments) with one that has them in `GLIBC_TUNABLES`.

Only a process that computes on its CPU is re-executed (`mmjax.backend.runs_on_cpu`:
JAX_PLATFORMS, else no GPU or TPU device on the host): on a GPU or TPU host the
step's buffers live on the device, and one arena would only serialise the loader
threads, Orbax's saves and TensorBoard on one malloc lock. Set
`MMJAX_SYSTEM_MALLOC=1` to keep glibc's defaults everywhere; a `GLIBC_TUNABLES`
that already names a `glibc.malloc.` tunable is left as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

from mmjax import backend

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                   "glibc.malloc.trim_threshold=1099511627776")
OPT_OUT = "MMJAX_SYSTEM_MALLOC"


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with MALLOC_TUNABLES added to GLIBC_TUNABLES, or None when it
  needs no change (opted out, or malloc tunables already chosen)."""
  if environ.get(OPT_OUT, "") not in ("", "0"):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc." in current:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join([t for t in current.split(":") if t] + list(MALLOC_TUNABLES))
  return env


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process with `tuned_environ`, on Linux with glibc; returns
  without doing anything elsewhere or when the environment already has it.

  Call it first in a `__main__`, before JAX (or anything else heavy) is imported.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  if not backend.runs_on_cpu(os.environ):
    return  # on a GPU / TPU host it would only serialise the host threads on one arena
  env = tuned_environ(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
