"""Every experiment config loads, has the public keys, and rejects unknown arguments."""

import glob
import importlib
import os

import pytest

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))
PUBLIC_KEYS = ("seed", "total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
               "keep_checkpoints", "mesh.data", "mesh.fsdp", "mesh.tensor", "optim.lr",
               "optim.warmup_steps", "optim.weight_decay", "model", "data")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_has_the_public_keys(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  for key in PUBLIC_KEYS:
    node = config
    for part in key.split("."):
      assert part in node, f"{name}: missing {key}"
      node = node[part]
  assert config.batch_size > 0 and config.total_steps > 0


def test_there_are_configs():
  assert {"clip_shapes", "clip_digits", "clip_vit_b16", "clip_vit_l14", "siglip_b16"} <= set(CONFIGS)


def test_parse_arg_types_and_errors():
  a = common.parse_arg("steps=5,runlocal=true,lr=0.5,name=x", steps=1, runlocal=False, lr=1.0,
                       name="y")
  assert a.steps == 5 and a.runlocal is True and a.lr == 0.5 and a.name == "x"
  with pytest.raises(ValueError, match="unknown config argument 'stpes'"):
    common.parse_arg("stpes=5", steps=1)
  with pytest.raises(ValueError, match="not a boolean"):
    common.parse_arg("runlocal=maybe", runlocal=False)
