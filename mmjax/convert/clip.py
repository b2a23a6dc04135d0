"""transformers' CLIPModel <-> mmjax CLIP (`mmjax.models.clip`).

Layouts: q/k/v weights [N*H, D] -> kernels [D, N, H]; out_proj [D, N*H] ->
[N, H, D]; the patch Conv2d [D, 3, P, P] -> a Dense kernel over (py, px, c)
patches [P*P*3, D]; class_embedding [D] -> cls_token [1, D]. HF's patch
embedding has no bias, ours does: it imports as zeros and, on export, is folded
into the patch rows of the position embedding (exact in real arithmetic).

Text pooling follows HF: a config with eos_token_id == 2 (checkpoints saved
before transformers PR #24773, OpenAI's included) pools at the argmax of the
ids, any other at the first eos_token_id.

A workdir trained here exports with its own tokenizer and preprocessing
(`plan_export`, `mmjax.convert.hf_tokenizer`). Its sentencepiece EOS is id 2,
which HF would read as argmax pooling: the export swaps EOS with the last id
(tokenizer and embedding rows alike). What HF's CLIPModel has no place for (the
swap, the patch bias before folding) is kept in `mmjax.safetensors`, which
transformers ignores; a re-import uses it to give back the trained params bit
for bit, and only while the weights still match it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.convert import common, hf_io, hf_tokenizer
from mmjax.convert.mapping import (ConversionError, Rule, attention_rules, dense_rules, linear,
                                   norm_rules)
from mmjax.models import clip as clip_lib
from mmjax.models.text import TEXT_SIZES, TextConfig
from mmjax.models.vit import VIT_SIZES, ViTConfig

IGNORED = (r"position_ids$",)
ARCHITECTURES = ("CLIPModel",)
HF_ARGMAX_EOS = 2  # transformers' CLIPTextModel pools by argmax when eos_token_id == 2


def vision_from_hf(v: dict, where: str = "vision_config") -> dict[str, Any]:
  """HF CLIPVisionConfig -> our model.vision dict."""
  common.require(v, "num_channels", 3, where)
  width, depth = v.get("hidden_size", 768), v.get("num_hidden_layers", 12)
  mlp, heads = v.get("intermediate_size", 3072), v.get("num_attention_heads", 12)
  patch, image = v.get("patch_size", 32), v.get("image_size", 224)
  if isinstance(patch, (list, tuple)) or isinstance(image, (list, tuple)):
    raise ConversionError(f"{where}: non-square image_size/patch_size {image}/{patch} is not "
                          f"supported")
  if width % heads:
    raise ConversionError(f"{where}.hidden_size={width} is not a multiple of "
                          f"num_attention_heads={heads}")
  out = {"pool": "cls", "pre_norm": True, "norm_eps": float(v.get("layer_norm_eps", 1e-5)),
         "act": common.activation(v.get("hidden_act", "quick_gelu"), f"{where}.hidden_act"),
         "image_size": int(image)}
  name = common.size_name(VIT_SIZES, (width, depth, mlp, heads))
  if name:
    out["variant"] = f"{name}/{patch}"
  else:
    out.update(variant=f"custom/{patch}", width=width, depth=depth, mlp_dim=mlp, num_heads=heads)
  return out


def vision_unsupported(v: ViTConfig, prefix: str = "model.vision") -> list[str]:
  """What of this ViT transformers' CLIPVisionModel cannot hold, each with the
  config key (under `prefix`) that would avoid it."""
  out = []
  if v.stem != "linear":
    out.append(f"a {v.stem} stem ({prefix}.stem={v.stem!r}; CLIP embeds patches linearly: "
               f"train with {prefix}.stem='linear')")
  if v.pool != "cls" or v.num_prefix_tokens != 1:
    out.append(f"{v.pool!r} pooling with {v.num_prefix_tokens} prefix tokens ({prefix}.pool, "
               f"{prefix}.num_prefix_tokens; CLIP pools its one class token: train with "
               f"pool='cls', num_prefix_tokens=1)")
  if not v.pre_norm:
    out.append(f"no norm after the embeddings ({prefix}.pre_norm=False; CLIP has one: train "
               f"with {prefix}.pre_norm=True)")
  if v.num_classes:
    out.append(f"a classification head ({prefix}.num_classes={v.num_classes}; train with 0)")
  return out


def unsupported(cfg: clip_lib.CLIPConfig) -> list[str]:
  """What of this CLIP no transformers class holds with the same numbers."""
  out = vision_unsupported(cfg.vision)
  if cfg.loss != "softmax":
    out.append(f"the {cfg.loss} loss's logit bias (model.loss={cfg.loss!r}; transformers' "
               f"SiglipModel has a bias but a bidirectional text tower pooled at the last "
               f"token, not this causal one pooled at EOS: train with model.loss='softmax')")
  return out


def _refusal(problems: list[str]) -> str:
  return ("this model does not export to transformers (no transformers class holds it with "
          "the same numbers); nothing was written:\n  - " + "\n  - ".join(problems))


def vision_to_hf(v: ViTConfig) -> dict[str, Any]:
  """Our ViTConfig -> HF CLIPVisionConfig fields; fails on what CLIP's ViT lacks."""
  problems = vision_unsupported(v)
  if problems:
    raise ConversionError(_refusal(problems))
  s = v.size
  return {"hidden_size": s["width"], "num_hidden_layers": s["depth"],
          "intermediate_size": s["mlp_dim"], "num_attention_heads": s["num_heads"],
          "patch_size": s["patch_size"], "image_size": v.image_size, "num_channels": 3,
          "hidden_act": common.hf_activation(v.act, "vision.act"), "layer_norm_eps": v.norm_eps,
          "model_type": "clip_vision_model"}


def config_from_hf(hf: dict) -> tuple[dict, dict]:
  """HF CLIPConfig -> (model.*, data.*) of our config."""
  t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
  vision = vision_from_hf(v)
  width, depth = t.get("hidden_size", 512), t.get("num_hidden_layers", 12)
  heads, mlp = t.get("num_attention_heads", 8), t.get("intermediate_size", 2048)
  if width % heads:
    raise ConversionError(f"text_config.hidden_size={width} is not a multiple of "
                          f"num_attention_heads={heads}")
  eos = t.get("eos_token_id", 49407)
  if not isinstance(eos, int):
    raise ConversionError(f"text_config.eos_token_id={eos!r}: a single id is needed for pooling")
  text = {"act": common.activation(t.get("hidden_act", "quick_gelu"), "text_config.hidden_act"),
          "norm_eps": float(t.get("layer_norm_eps", 1e-5)),
          "vocab_size": int(t.get("vocab_size", 49408)),
          "pool": "argmax" if eos == HF_ARGMAX_EOS else "eos",
          "eos_id": int(eos)}
  name = common.size_name(TEXT_SIZES, (width, depth, heads))
  if name and mlp == 4 * width:
    text["size"] = name
  else:
    text.update(size="custom", width=width, depth=depth, num_heads=heads, mlp_dim=mlp)
  model = {
      "vision": {k: val for k, val in vision.items() if k != "image_size"},
      "text": text,
      "embed_dim": int(hf.get("projection_dim", 512)),
      "loss": "softmax",
      "dtype": "float32",
      "scan": True,
      "remat": "none",
  }
  data = {"image_size": vision["image_size"],
          "context_length": int(t.get("max_position_embeddings", 77))}
  return model, data


def model_config(config) -> clip_lib.CLIPConfig:
  """The CLIPConfig that CLIPTask builds from this config (with the text ids explicit)."""
  m, d = config.model, config.data
  text = {k: v for k, v in m.text.items()}
  if not text.get("vocab_size"):  # a run trained here: the vocabulary of its tokenizer
    from mmjax.train import tasks
    text.update(tasks.token_ids(m.text, workdir_tokenizer(config)))
  text.update(context_length=d.context_length, dtype=m.dtype, scan=m.scan, remat=m.remat)
  vision = {k: v for k, v in m.vision.items()}
  vision.update(image_size=d.image_size, dtype=m.dtype, scan=m.scan, remat=m.remat)
  return clip_lib.CLIPConfig(vision=ViTConfig(**vision), text=TextConfig(**text),
                             embed_dim=m.embed_dim, loss=m.loss)


def hf_config(cfg: clip_lib.CLIPConfig, base: dict | None = None, dtype: str = "float32",
              plan: ExportPlan | None = None) -> dict:
  """Our CLIPConfig -> a HF CLIPConfig dict (`base`, the imported one, keeps the
  fields that do not change the numbers; `plan` moves the EOS id)."""
  problems = unsupported(cfg)
  if problems:
    raise ConversionError(_refusal(problems))
  t = cfg.text
  if t.pool == "argmax":
    eos = HF_ARGMAX_EOS
  elif plan is not None and plan.swap:
    eos = plan.swap[1]
  elif t.eos_id == HF_ARGMAX_EOS:
    raise ConversionError(
        "text.eos_id=2 with pool='eos' cannot be expressed in transformers' CLIPTextModel: it "
        "treats eos_token_id == 2 as the legacy argmax pooling. Train with a tokenizer whose "
        "EOS id is not 2 (or the largest id, with pool='argmax') to export")
  else:
    eos = t.eos_id
  width, depth, heads = t.dims
  base = dict(base or {})
  text = dict(base.get("text_config") or {})
  text.update({"vocab_size": t.vocab_size, "hidden_size": width, "num_hidden_layers": depth,
               "num_attention_heads": heads, "intermediate_size": t.hidden_dim,
               "max_position_embeddings": t.context_length,
               "hidden_act": common.hf_activation(t.act, "text.act"), "layer_norm_eps": t.norm_eps,
               "eos_token_id": eos, "model_type": "clip_text_model"})
  if plan is not None:
    text.update(bos_token_id=plan.bos_id, pad_token_id=plan.pad_id)
  text.setdefault("pad_token_id", t.pad_id)
  text.setdefault("bos_token_id", 49406 if t.vocab_size == 49408 else 0)
  vision = dict(base.get("vision_config") or {})
  vision.update(vision_to_hf(cfg.vision))
  base.update({"architectures": ["CLIPModel"], "model_type": "clip",
               "projection_dim": cfg.embed_dim, "text_config": text, "vision_config": vision,
               "dtype": dtype})
  base.setdefault("logit_scale_init_value", 2.6592)
  base.pop("torch_dtype", None)
  return base


def vision_rules(v: ViTConfig, prefix: str, hf: str) -> list[Rule]:
  """The ViT under `prefix` <-> a HF CLIPVisionTransformer under `hf` (no trailing dot)."""
  s = v.size
  d, p, depth, heads = s["width"], s["patch_size"], s["depth"], s["num_heads"]
  layer = f"{prefix}/encoder/layers/block"
  hl = f"{hf}.encoder.layers.{{i}}"
  rules = [
      Rule(f"{prefix}/patch_embed/kernel", f"{hf}.embeddings.patch_embedding.weight",
           lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * w.shape[1], w.shape[0]),
           lambda k: k.reshape(p, p, -1, d).transpose(3, 2, 0, 1)),
      Rule(f"{prefix}/patch_embed/bias", None),
      Rule(f"{prefix}/cls_token", f"{hf}.embeddings.class_embedding",
           lambda x: x[None], lambda x: x[0]),
      Rule(f"{prefix}/pos_embed", f"{hf}.embeddings.position_embedding.weight"),
      *norm_rules(f"{prefix}/pre_norm", f"{hf}.pre_layrnorm"),
      *norm_rules(f"{prefix}/final_norm", f"{hf}.post_layernorm"),
  ]
  return rules + _block_rules(layer, hl, depth, heads, d // heads)


def _block_rules(layer: str, hl: str, depth: int, heads: int, head_dim: int) -> list[Rule]:
  return [
      *attention_rules(f"{layer}/attn", f"{hl}.self_attn", depth, heads, head_dim),
      *norm_rules(f"{layer}/norm1", f"{hl}.layer_norm1", depth),
      *norm_rules(f"{layer}/norm2", f"{hl}.layer_norm2", depth),
      *dense_rules(f"{layer}/mlp/fc1", f"{hl}.mlp.fc1", depth),
      *dense_rules(f"{layer}/mlp/fc2", f"{hl}.mlp.fc2", depth),
  ]


def rules(cfg: clip_lib.CLIPConfig, layout=None) -> list[Rule]:
  del layout
  width, depth, heads = cfg.text.dims
  return [
      *vision_rules(cfg.vision, "vision", "vision_model"),
      Rule("text/token_embed/embedding", "text_model.embeddings.token_embedding.weight"),
      Rule("text/pos_embed", "text_model.embeddings.position_embedding.weight"),
      *norm_rules("text/final_norm", "text_model.final_layer_norm"),
      *_block_rules("text/encoder/layers/block", "text_model.encoder.layers.{i}", depth, heads,
                    width // heads),
      Rule("image_proj/kernel", "visual_projection.weight", linear, linear),
      Rule("text_proj/kernel", "text_projection.weight", linear, linear),
      Rule("log_scale", "logit_scale"),
  ]


def fold_patch_bias(vision_params: dict) -> dict:
  """HF has no patch-embedding bias: add ours to the patch rows of the position
  embedding (the class row never saw it) and zero it."""
  bias = np.asarray(vision_params["patch_embed"]["bias"], np.float32)
  if not np.any(bias):
    return vision_params
  pos = np.array(vision_params["pos_embed"], np.float32)
  pos[1:] += bias
  out = dict(vision_params)
  out["pos_embed"] = pos
  out["patch_embed"] = dict(vision_params["patch_embed"], bias=np.zeros_like(bias))
  return out


def prepare_export(params: dict, cfg: clip_lib.CLIPConfig, plan: ExportPlan | None = None) -> dict:
  del cfg
  out = dict(params, vision=fold_patch_bias(params["vision"]))
  if plan is not None and plan.swap:
    out["text"] = _swap_token_rows(params["text"], *plan.swap)
  return out


def _swap_token_rows(text_params: dict, a: int, b: int) -> dict:
  table = np.array(text_params["token_embed"]["embedding"])
  table[[a, b]] = table[[b, a]]
  return dict(text_params, token_embed={"embedding": table})


# -- a workdir trained here: its tokenizer and preprocessing --------------------

SIDECAR = hf_io.SIDECARS[0]  # what CLIPModel has no place for (transformers ignores it)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
  """The files a CLIP export writes beside the weights, worked out before anything is.

  tokenizer: the tokenizer.json dict to write (ids already swapped), or None:
  the workdir's own tokenizer/ files are copied (an imported workdir).
  swap: token ids exchanged so that HF pools at EOS (see the module doc).
  """

  tokenizer: dict | None
  swap: tuple[int, int] | None
  bos_id: int
  eos_id: int
  pad_id: int
  context_length: int
  preprocessor: dict | None
  spm_model: str | None  # the sentencepiece model the tokenizer came from


def workdir_tokenizer(config):
  """The tokenizer a CLIP workdir was trained with (`data.tokenizer`, else its dataset's)."""
  from mmjax.data import pipeline
  try:
    return pipeline.dataset_tokenizer(config.data)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(f"the workdir's tokenizer cannot be loaded ({e}); set "
                          f"data.tokenizer in its config.json to the tokenizer it was trained "
                          f"with") from e


def plan_export(workdir: str, config, cfg: clip_lib.CLIPConfig) -> ExportPlan:
  """Checks that transformers holds this CLIP (raising, naming each feature it
  lacks and the config key that avoids it) and works out the tokenizer and
  preprocessor files of the export. Writes nothing."""
  from mmjax.convert import workdir as workdir_lib
  from mmjax.data import pipeline
  problems = unsupported(cfg)
  transforms = config.data.get("transforms") or {}
  if transforms.get("pad_to_square"):
    problems.append("padding images to a square (data.transforms.pad_to_square=True; "
                    "CLIPImageProcessor resizes and crops: set it False)")
  if problems:
    raise ConversionError(_refusal(problems))
  t = cfg.text
  preprocessor = hf_tokenizer.preprocessor_config(cfg.vision.image_size,
                                                  transforms.get("normalize", "clip"))
  swap = None
  if t.pool == "eos" and t.eos_id == HF_ARGMAX_EOS and t.vocab_size - 1 != HF_ARGMAX_EOS:
    swap = (HF_ARGMAX_EOS, t.vocab_size - 1)
  if swap is None and (config.get("source") or {}).get("format") == "hf":
    # An imported workdir: its own tokenizer and processor files, as they came.
    return ExportPlan(None, None, 0, t.eos_id, t.pad_id, t.context_length, None, None)
  workdir_lib.use_local_tokenizer(config, workdir)
  tok = workdir_tokenizer(config)
  path = pipeline.tokenizer_file(config.data)
  if os.path.isdir(path):
    path = next(os.path.join(path, n) for n in ("tokenizer.model", "tokenizer.json")
                if os.path.exists(os.path.join(path, n)))
  if path.endswith(".json"):
    with open(path) as f:
      data = json.load(f)
    data["post_processor"] = hf_tokenizer.bos_eos_template(
        hf_tokenizer.token_name(data, tok.bos_id), tok.bos_id,
        hf_tokenizer.token_name(data, tok.eos_id), tok.eos_id)
    spm_model = None
  else:
    data, spm_model = hf_tokenizer.from_sentencepiece(path), path
  if swap:
    data = hf_tokenizer.swap_ids(data, *swap)
  moved = lambda i: {swap[0]: swap[1], swap[1]: swap[0]}.get(i, i) if swap else i  # noqa: E731
  return ExportPlan(data, swap, moved(tok.bos_id), moved(t.eos_id), moved(t.pad_id),
                    t.context_length, preprocessor, spm_model)


def write_export_files(out: str, workdir: str, plan: ExportPlan, params: dict) -> None:
  """The tokenizer and preprocessor files, and the sidecar of an exact re-import
  (`params` as trained, before `prepare_export`)."""
  from mmjax.convert import workdir as workdir_lib
  if plan.tokenizer is None:
    hf_io.copy_files(os.path.join(workdir, workdir_lib.TOKENIZER_DIR), out)
    return
  hf_tokenizer.write(out, plan.tokenizer, bos_id=plan.bos_id, eos_id=plan.eos_id,
                     pad_id=plan.pad_id, context_length=plan.context_length)
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump(plan.preprocessor, f, indent=2)
  vision = params["vision"]
  tensors = {"vision.patch_embed.bias": np.asarray(vision["patch_embed"]["bias"]),
             "vision.pos_embed": np.asarray(vision["pos_embed"])}
  metadata = {"token_swap": json.dumps(list(plan.swap) if plan.swap else None)}
  if plan.spm_model:
    import shutil
    shutil.copyfile(plan.spm_model, os.path.join(out, hf_tokenizer.SPM_MODEL))
    metadata["tokenizer"] = hf_tokenizer.SPM_MODEL
  hf_io.save_file(tensors, os.path.join(out, SIDECAR), metadata=metadata)


def restore_exact(src: str, config, params: dict) -> dict:
  """An import of a folder this module exported: the trained params (patch bias
  unfolded, token rows back in place) and the sentencepiece tokenizer, where
  `mmjax.safetensors` is there and the weights still match it."""
  path = os.path.join(src, SIDECAR)
  if not os.path.exists(path):
    return params
  from safetensors import safe_open
  with safe_open(path, framework="np") as f:
    meta = f.metadata() or {}
    side = {k: f.get_tensor(k) for k in f.keys()}
  imported = np.asarray(params["vision"]["pos_embed"])
  bias, pos = side["vision.patch_embed.bias"], side["vision.pos_embed"]
  folded = fold_patch_bias({"patch_embed": {"bias": bias}, "pos_embed": pos})["pos_embed"]
  if imported.shape != pos.shape or not np.array_equal(
      np.asarray(folded, imported.dtype), imported):
    return params  # the weights changed since the export: take them as they are
  out = dict(params)
  out["vision"] = dict(params["vision"], pos_embed=pos.astype(imported.dtype),
                       patch_embed=dict(params["vision"]["patch_embed"], bias=bias))
  swap = json.loads(meta.get("token_swap") or "null")
  tokenizer = meta.get("tokenizer")
  spm = os.path.join(src, tokenizer) if tokenizer else None
  if swap and spm and config.data.tokenizer and os.path.exists(spm):
    a, b = swap
    out["text"] = _swap_token_rows(params["text"], a, b)
    if config.model.text.eos_id == b:
      config.model.text.eos_id = a
    # The copy of the export's tokenizer.model beside the tokenizer.json in use.
    config.data.tokenizer = os.path.join(os.path.dirname(config.data.tokenizer), tokenizer)
  return out


# -- the family interface (see mmjax.convert) ---------------------------------

TASKS = ("clip",)


def workdir_config(hf: dict, src: str, tokenizer: str | None):
  model, data = config_from_hf(hf)
  data["transforms"] = common.preprocessing(src, data["image_size"])
  data["tokenizer"] = os.path.abspath(tokenizer) if tokenizer else None
  return common.workdir_config("clip", model, data, {})


def build_model(cfg: clip_lib.CLIPConfig):
  return clip_lib.CLIP(cfg)


def init_args(cfg: clip_lib.CLIPConfig) -> tuple:
  s, t = cfg.vision.image_size, cfg.text.context_length
  return jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, t), jnp.int32)
