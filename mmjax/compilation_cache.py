"""JAX's persistent compilation cache: compiled programs kept on disk, so a
second run of the same program (a resumed run, an evaluation after training,
the next test) loads it instead of compiling it again.

It is off unless asked for, in this order:
- `enable(setting)` with a setting, as the entry points' `--compilation_cache`
  flag passes it;
- otherwise the environment variable `MMJAX_COMPILATION_CACHE`.

A setting is "off" (or "0", "false", ""), "on" (or "1", "true": the default
folder, `$XDG_CACHE_HOME/mmjax/jax`, `~/.cache/mmjax/jax` without it), or a
folder. The test suite turns it on (tests/conftest.py), and every process it
starts inherits the variable.

It stays off in a run of several processes (`jax.distributed` initialized):
on one machine they share the folder, and a program that one process loads
while another compiles it (an entry written in between) runs collectives that
never meet, and the run hangs. Call `enable` after `jax.distributed.initialize`.

Entries are keyed by the program, the devices' kind and count, the compile
options and the jax / jaxlib versions, so a stale entry is never used; the
folder is trimmed to `MAX_BYTES`, least recently used first. The key does not
name the host's instruction set, which XLA:CPU compiles for, so each kind of
host (a home folder shared by several machines) writes its own subfolder,
`host_tag()`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform

ENV = "MMJAX_COMPILATION_CACHE"
MAX_BYTES = 4 << 30
# Smaller programs compile faster than their entry is written and read back.
MIN_COMPILE_SECONDS = 0.2

_OFF = ("", "0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")


def default_dir(environ=os.environ) -> str:
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mmjax", "jax")


def resolve(setting: str | None = None, environ=os.environ) -> str | None:
  """The cache folder that `setting` (or, when it is None, $MMJAX_COMPILATION_CACHE)
  asks for; None when the cache is off."""
  if setting is None:
    setting = environ.get(ENV, "")
  value = setting.strip()
  if value.lower() in _OFF:
    return None
  if value.lower() in _ON:
    return default_dir(environ)
  return os.path.abspath(os.path.expanduser(value))


def host_tag() -> str:
  """The machine type and a digest of its CPU's features (/proc/cpuinfo)."""
  features = ""
  try:
    with open("/proc/cpuinfo") as f:
      features = next((line.split(":", 1)[1].strip() for line in f
                       if line.startswith(("flags", "Features"))), "")
  except OSError:
    pass
  machine = platform.machine() or "host"
  digest = hashlib.sha256(f"{machine} {platform.processor()} {features}".encode()).hexdigest()
  return f"{machine}-{digest[:12]}"


def enable(setting: str | None = None) -> str | None:
  """Points JAX's persistent cache at this host's subfolder of the folder
  `resolve(setting)` names, creating it; returns that subfolder, or None (the
  cache left off, as it is in a multi-process run). Call it after
  `jax.distributed.initialize` and before the first compilation."""
  base = resolve(setting)
  if base is None:
    return None
  path = os.path.join(base, host_tag())
  import jax
  if jax.distributed.is_initialized():
    logging.info("compilation cache off: this is one of several processes (see %s)", __name__)
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f"the compilation cache folder {path} (from --compilation_cache or "
                  f"${ENV}) cannot be created: {e}") from e
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path
