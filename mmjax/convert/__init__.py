"""HF checkpoints (CLIP, Llama, LLaVA; safetensors + config.json + tokenizer) <->
mmjax workdirs.

  python -m mmjax.convert --src=HF_DIR --out=WORKDIR           # import
  python -m mmjax.convert --to=hf --src=WORKDIR --out=HF_DIR   # export

An import writes WORKDIR/config.json (task, model.*, data.* with the tokenizer
and the preprocessing of the checkpoint), checkpoints/0 (the params, float32),
tokenizer/ (the tokenizer and processor files) and hf_config.json (the
original config, the base of a later export).

Each model family is a module (`FAMILIES` maps HF architectures to it) with:
  ARCHITECTURES, TASKS, IGNORED           names; HF tensors an import may skip
  workdir_config(hf_config, src, tokenizer) -> ConfigDict   fails naming an unsupported field
  model_config(config) -> the model's config dataclass (as the task builds it)
  build_model(cfg), init_args(cfg)        the Flax module and dummy inputs for eval_shape
  rules(cfg, layout) -> [mapping.Rule]    every param <-> its HF tensor(s)
  hf_config(cfg, base, dtype) -> dict     the HF config.json of an export
  prepare_export(params, cfg) -> params   folds what HF lacks (a patch bias)
  optional: ignored(cfg), layout(keys)    per-config skips; the file's key prefixes
  optional: plan_export(workdir, config, cfg) -> plan   checks and plans an export
            before anything is written (a run trained here: its tokenizer and
            preprocessing); hf_config and prepare_export then take plan=,
            write_export_files(out, workdir, plan, params) writes the files;
            restore_exact(src, config, params) -> params   an import's last step
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import Counter
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax import parallel
from mmjax.convert import hf_io, mapping, workdir as workdir_lib
from mmjax.convert.mapping import ConversionError

# HF architecture -> our family module.
FAMILIES: dict[str, str] = {
    "CLIPModel": "mmjax.convert.clip",
    "LlamaForCausalLM": "mmjax.convert.llama",
    "LlavaForConditionalGeneration": "mmjax.convert.llava",
}
# HF model_type -> architecture, for configs that do not name one.
MODEL_TYPES = {"clip": "CLIPModel", "llama": "LlamaForCausalLM",
               "llava": "LlavaForConditionalGeneration"}
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def family_for_hf(hf_config: dict):
  archs = hf_config.get("architectures") or []
  arch = next((a for a in archs if a in FAMILIES), None)
  if arch is None:
    arch = MODEL_TYPES.get(hf_config.get("model_type", ""))
  if arch is None:
    raise ConversionError(
        f"unsupported HF model: architectures={archs}, model_type={hf_config.get('model_type')!r}; "
        f"supported: {sorted(FAMILIES)}")
  return _family_module(arch)


def family_for_task(task: str):
  for name in FAMILIES.values():
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      continue
    if task in getattr(module, "TASKS", ()):
      return module
  raise ConversionError(f"no converter exports task {task!r} to transformers")


def _family_module(arch: str):
  try:
    return importlib.import_module(FAMILIES[arch])
  except ModuleNotFoundError as e:
    if e.name == FAMILIES[arch]:
      raise ConversionError(f"{arch}: this converter is not written yet") from e
    raise


def abstract_params(module: nn.Module, init_args: tuple, mesh=None, rules=None) -> Any:
  """ShapeDtypeStructs of the params, with shardings on `mesh` when given."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args))["params"]
  unboxed = nn.meta.unbox(boxed)
  if mesh is None:
    return unboxed
  shardings = parallel.shardings_for(boxed, mesh, rules or parallel.DEFAULT_RULES)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      unboxed, shardings)


def import_hf(src: str, out: str, mesh=None) -> Any:
  """Converts the HF folder `src` into the workdir `out`; returns its config.

  Tensors stream from the safetensors files onto `mesh` (default: every
  device on the fsdp axis), each device reading the tensors of its own shard.
  """
  hf_config = hf_io.read_config(src)
  family = family_for_hf(hf_config)
  if os.path.exists(os.path.join(out, workdir_lib.CONFIG_NAME)):
    raise FileExistsError(f"{out} already holds a workdir; convert into an empty folder")
  os.makedirs(out, exist_ok=True)
  tok_dir = os.path.join(out, workdir_lib.TOKENIZER_DIR)
  tokenizer = None
  if jax.process_index() == 0 and hf_io.copy_files(src, tok_dir):
    tokenizer = hf_io.ensure_tokenizer_json(tok_dir)
  if tokenizer is None:
    logging.warning("%s has no tokenizer files: text inputs need data.tokenizer set by hand", src)
  with hf_io.SafetensorsReader(src) as reader:
    counts = Counter(reader.dtype(k) for k in reader.keys())
    dtype = _DTYPES.get(counts.most_common(1)[0][0], "float32")
    config = family.workdir_config(hf_config, src, tokenizer=tokenizer)
    config.source = {"format": "hf", "path": os.path.abspath(src),
                     "architecture": family.ARCHITECTURES[0], "dtype": dtype}
    model_cfg = family.model_config(config)
    mesh = mesh or parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    abstract = abstract_params(family.build_model(model_cfg), family.init_args(model_cfg), mesh)
    ignore = family.ignored(model_cfg) if hasattr(family, "ignored") else family.IGNORED
    layout = family.layout(reader.keys()) if hasattr(family, "layout") else None
    if layout:
      config.source.layout = layout
    params = mapping.load_params(reader, family.rules(model_cfg, layout), abstract,
                                 ignore=ignore)
  if hasattr(family, "restore_exact"):
    exact = family.restore_exact(src, config, params)
    params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), exact, params)
  workdir_lib.save(out, config, params)
  if jax.process_index() == 0:
    import json
    with open(os.path.join(out, workdir_lib.HF_CONFIG_NAME), "w") as f:
      json.dump(hf_config, f, indent=2)
  return config


def load_params(workdir: str, family=None, config=None, mesh=None, step: int | None = None):
  """(config, family, model config, params) of a workdir, params restored onto
  `mesh` (default: the first device)."""
  config = config or workdir_lib.load_config(workdir)
  family = family or family_for_task(config.task)
  model_cfg = family.model_config(config)
  abstract = abstract_params(family.build_model(model_cfg), family.init_args(model_cfg), mesh)
  return config, family, model_cfg, workdir_lib.restore_params(workdir, abstract, step)


def export_hf(workdir: str, out: str, dtype: str | None = None, step: int | None = None,
              max_shard_bytes: int = 5 * 2**30) -> dict:
  """Writes the workdir's params as a HF folder (config.json, safetensors, the
  tokenizer files it has). `dtype` defaults to the imported checkpoint's, else
  float32. Returns the HF config written."""
  import json
  if os.path.isdir(out) and any(n.endswith(".safetensors") or n == hf_io.INDEX_NAME
                                for n in os.listdir(out)):
    raise FileExistsError(f"{out} already holds safetensors weights; export into an empty folder")
  config = workdir_lib.load_config(workdir)
  family = family_for_task(config.task)
  plan, with_plan = None, {}
  if hasattr(family, "plan_export"):  # fails on what transformers cannot hold, writing nothing
    plan = family.plan_export(workdir, config, family.model_config(config))
    with_plan = {"plan": plan}
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})  # a 7B fits across devices
  config, family, model_cfg, params = load_params(workdir, family, config, mesh=mesh, step=step)
  source = config.get("source") or {}
  dtype = dtype or source.get("dtype") or "float32"
  np_dtype = _np_dtype(dtype)
  base = None
  base_path = os.path.join(workdir, workdir_lib.HF_CONFIG_NAME)
  if os.path.exists(base_path):
    with open(base_path) as f:
      base = json.load(f)
  hf_config = family.hf_config(model_cfg, base=base, dtype=dtype, **with_plan)
  trained = mapping.scanned(params)
  params = family.prepare_export(trained, model_cfg, **with_plan)
  tensors = mapping.export_tensors(params, family.rules(model_cfg, source.get("layout")), np_dtype)
  if jax.process_index() != 0:
    for _ in tensors:  # every process takes part in gathering the shards
      pass
    return hf_config
  os.makedirs(out, exist_ok=True)
  hf_io.write_safetensors(out, tensors, max_shard_bytes)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  if plan is not None:
    family.write_export_files(out, workdir, plan, trained)
  else:
    hf_io.copy_files(os.path.join(workdir, workdir_lib.TOKENIZER_DIR), out)
  return hf_config


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if name not in ("float32", "float16"):
    raise ConversionError(f"unsupported export dtype {name!r}; choose float32, bfloat16, float16")
  return np.dtype(name)
