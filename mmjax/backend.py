"""What is tuned for one platform, decided from the backend in one place.

XLA:CPU gains from forms of the core layers that XLA on a GPU or TPU has no use
for: hand-written backward passes of the dense matmul, LayerNorm and SwiGLU
(`mmjax.models.layers`), and SwiGLU's gate and up projections as one matmul.
They are `custom_vjp` functions, so they also rule out forward-mode autodiff
(`jax.jvp`, `jax.jacfwd`). `cpu_tuning()` says whether the layers use them:

- by default, when the platform the run compiles for is CPU (`configure` is
  given the mesh's devices; without it, JAX's default backend decides);
- `--config.cpu_tuning=true|false` (or `MMJAX_CPU_TUNING=1|0`) overrides.

`platform()` is the platform the run compiles for ("cpu", "gpu" or "tpu"), from
the same devices; attention's "auto" (`mmjax.models.attention`) follows it. A
plan for a TPU topology compiled on a CPU host (`mmjax.plan`) compiles for TPU
(`compiling_for`), so it gets the plain layers and the TPU kernels. The host's
malloc (`mmjax.hostenv`) is decided before JAX starts, by
`runs_on_cpu(os.environ)`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

ENV = "MMJAX_CPU_TUNING"
_setting: bool | None = None  # None: from the platform
_platform: str | None = None  # None: JAX's default backend


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
  """Fixes `cpu_tuning()` (see `choose`) and `platform()` (that of `devices`)
  for this process; returns the cpu_tuning choice."""
  global _setting, _platform
  _setting = choose(setting, devices)
  _platform = devices[0].platform if devices else None
  return _setting


def platform() -> str:
  """The platform the run compiles for: "cpu", "gpu" or "tpu" (read at trace time)."""
  if _platform is not None:
    return _platform
  import jax
  return jax.default_backend()


@contextlib.contextmanager
def compiling_for(devices: Sequence[Any], setting: Any = "auto") -> Iterator[None]:
  """Within the block, `platform()` and `cpu_tuning()` are those of `devices`
  (a TPU topology's, for a plan compiled on this host)."""
  global _setting, _platform
  before = _setting, _platform
  _setting, _platform = choose(setting, devices), devices[0].platform
  try:
    yield
  finally:
    _setting, _platform = before


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
