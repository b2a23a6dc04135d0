"""What is tuned for one platform, decided from the backend in one place.

XLA:CPU gains from forms of the core layers that XLA on a GPU or TPU has no use
for: hand-written backward passes of the dense matmul, LayerNorm and SwiGLU
(`mmjax.models.layers`), and SwiGLU's gate and up projections as one matmul.
They are `custom_vjp` functions, so they also rule out forward-mode autodiff
(`jax.jvp`, `jax.jacfwd`). `cpu_tuning()` says whether the layers use them:

- by default, when the platform the run compiles for is CPU (`configure` is
  given the mesh's devices; without it, JAX's default backend decides);
- `--config.cpu_tuning=true|false` (or `MMJAX_CPU_TUNING=1|0`) overrides.

A plan for a TPU topology compiled on a CPU host (`mmjax.plan`) compiles for
TPU, so it gets the plain layers. The host's malloc (`mmjax.hostenv`) is decided
before JAX starts, by `runs_on_cpu(os.environ)`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

ENV = "MMJAX_CPU_TUNING"
_setting: bool | None = None  # None: from the platform


def _parse(value: Any, where: str) -> bool | None:
  if value is None or (isinstance(value, str) and value.lower() in ("", "auto")):
    return None
  if isinstance(value, bool):
    return value
  text = str(value).lower()
  if text in ("1", "true", "on"):
    return True
  if text in ("0", "false", "off"):
    return False
  raise ValueError(f"{where}={value!r}: use auto, true or false")


def choose(setting: Any = "auto", devices: Sequence[Any] | None = None) -> bool:
  """The CPU forms or not, from MMJAX_CPU_TUNING, else a config value (auto /
  true / false), else the platform of `devices` (default: JAX's backend)."""
  chosen = _parse(os.environ.get(ENV), ENV)
  if chosen is None:
    chosen = _parse(setting, "cpu_tuning")
  if chosen is None:
    if devices:
      chosen = devices[0].platform == "cpu"
    else:
      import jax
      chosen = jax.default_backend() == "cpu"
  return chosen


def configure(setting: Any = "auto", devices: Sequence[Any] | None = None) -> bool:
  """Fixes `cpu_tuning()` for this process (see `choose`); returns the choice."""
  global _setting
  _setting = choose(setting, devices)
  return _setting


def cpu_tuning() -> bool:
  """Whether the layers use their CPU forms (read at trace time)."""
  if _setting is None:
    return configure()
  return _setting


@contextlib.contextmanager
def cpu_tuning_as(value: bool) -> Iterator[None]:
  """Within the block, cpu_tuning() is `value` (functions traced inside see it)."""
  global _setting
  before = _setting
  _setting = bool(value)
  try:
    yield
  finally:
    _setting = before


def runs_on_cpu(environ: Mapping[str, str],
                exists: Callable[[str], bool] = os.path.exists) -> bool:
  """Before JAX is imported: will this process compute on its CPU? JAX_PLATFORMS
  decides when set (its first entry); otherwise a GPU (/dev/nvidiactl) or TPU
  (/dev/accel0, /dev/vfio/0, TPU_ACCELERATOR_TYPE) on the host means no."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if environ.get("TPU_ACCELERATOR_TYPE"):
    return False
  return not any(exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0"))
