"""Test setup: 8 fake CPU devices for mesh tests, set before jax is imported;
JAX's persistent compilation cache on (mmjax.compilation_cache), for this
process and every process a test starts ($MMJAX_COMPILATION_CACHE=off turns
it off, a folder moves it)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MMJAX_COMPILATION_CACHE", "on")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from mmjax import compilation_cache  # noqa: E402
from mmjax.models.clip import CLIPConfig  # noqa: E402
from mmjax.models.text import TextConfig  # noqa: E402
from mmjax.models.vit import ViTConfig  # noqa: E402

compilation_cache.enable()


def tiny_clip_config(**overrides) -> CLIPConfig:
  """A CLIP small enough for unit tests (widths divisible by 8 for mesh tests)."""
  base = dict(
      vision=ViTConfig(variant="tiny/8", image_size=32, pre_norm=True, norm_eps=1e-5),
      text=TextConfig(size="tiny", vocab_size=64, context_length=16, eos_id=2),
      embed_dim=16,
  )
  base.update(overrides)
  return CLIPConfig(**base)


@pytest.fixture
def rng():
  return jax.random.key(0)


def init_params(model, *args, seed: int = 0):
  """Jitted init (eager init of a scanned model is slow), params unboxed."""
  import flax.linen as nn
  return nn.unbox(jax.jit(model.init)(jax.random.key(seed), *args))["params"]


# Longest first, so that with `-n 2` the multi-process matrix (minutes, one
# worker) starts at once while the other worker takes the rest. Each module
# runs whole on one worker (`--dist=loadfile --no-loadscope-reorder` in
# pyproject.toml), in this order: a module-scoped fixture (a trained workdir,
# the matrix's runs) is built once, not once per worker.
HEAVY_FIRST = ("test_multiprocess", "test_recipes", "test_faults", "test_llava", "test_cli",
               "test_tasks_vit", "test_embed", "test_plan", "test_sharding_plans",
               "test_convert_trained", "test_benchmarks", "test_train",
               "test_visualize", "test_scale_mesh", "test_llm", "test_layers", "test_parallel")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items[:] = sorted(items, key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1],
                                                     len(rank)))
