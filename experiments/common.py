"""Shared pieces of experiment configs: the argument parser and the common keys."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x,c=true' -> ConfigDict, each value typed like its default.

  Unknown keys fail, naming the known ones, so a typo never runs silently.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def base_config(task: str) -> ml_collections.ConfigDict:
  """The keys every experiment has, so that any run can be reshaped from the
  command line (docs/training.md)."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256  # global
  c.log_every = 50
  c.eval_every = 500
  c.eval_at_start = False  # also evaluate the starting params, logged as step 0
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.profile_steps = 0
  # The layers' CPU forms (mmjax.backend): auto = where the run's devices are CPUs.
  c.cpu_tuning = "auto"
  # preset: "" (use the sizes) | dp | fsdp | fsdp_tensor | multislice (parallel.PRESETS);
  # dcn: slices (data parallel across them).
  c.mesh = ml_collections.ConfigDict({"preset": "", "dcn": 1, "data": -1, "fsdp": 1,
                                      "tensor": 1})
  # Logical data shards; 0 = one per process. A multiple of every process count
  # you run with makes the global batches independent of that count.
  c.data_shards = 0
  c.rules = ml_collections.FieldReference(None, field_type=list)  # None: parallel.DEFAULT_RULES
  c.optim = ml_collections.ConfigDict({
      "lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.1, "schedule": "cosine",
      "end_lr_ratio": 0.0, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "clip_norm": 1.0,
      "grad_accum": 1, "frozen": [],
  })
  c.eval = ml_collections.ConfigDict({"batch_size": 256, "zeroshot": True})
  return c


def clip_init() -> ml_collections.ConfigDict:
  """Where a CLIP run starts from: None = random, or a workdir (a run, or one
  written by `python -m mmjax.convert`) whose params are loaded."""
  return ml_collections.ConfigDict({"clip_workdir": ml_collections.FieldReference(None, str)})


def clip_model(vision_variant: str, text_size: str, embed_dim: int, *, loss: str = "softmax",
               act: str = "gelu", dtype: str = "float32", scan: bool = True,
               remat: str = "none") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      # attention_impl: auto | cpu | xla | cudnn | splash (mmjax.models.attention)
      "vision": {"variant": vision_variant, "pool": "cls", "pre_norm": True, "norm_eps": 1e-5,
                 "act": act, "attention_impl": "auto"},
      "text": {"size": text_size, "act": act, "vocab_size": 0,  # 0: the tokenizer's
               "attention_impl": "auto"},
      "embed_dim": embed_dim,
      "loss": loss,
      "dtype": dtype,
      "scan": scan,
      "remat": remat,
      "chunked_loss": False,  # the B x B logits split over devices (collective_losses)
  })
