"""transformers' CLIPModel <-> mmjax CLIP (`mmjax.models.clip`).

Layouts: q/k/v weights [N*H, D] -> kernels [D, N, H]; out_proj [D, N*H] ->
[N, H, D]; the patch Conv2d [D, 3, P, P] -> a Dense kernel over (py, px, c)
patches [P*P*3, D]; class_embedding [D] -> cls_token [1, D]. HF's patch
embedding has no bias, ours does: it imports as zeros and, on export, is folded
into the patch rows of the position embedding (exact in real arithmetic).

Text pooling follows HF: a config with eos_token_id == 2 (checkpoints saved
before transformers PR #24773, OpenAI's included) pools at the argmax of the
ids, any other at the first eos_token_id.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.convert import common
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


def vision_to_hf(v: ViTConfig) -> dict[str, Any]:
  """Our ViTConfig -> HF CLIPVisionConfig fields; fails on what CLIP's ViT lacks."""
  if v.pool != "cls" or v.num_prefix_tokens != 1 or not v.pre_norm or v.stem != "linear" \
      or v.num_classes:
    raise ConversionError(
        f"only a CLIP-style ViT exports to transformers (pool='cls', pre_norm=True, one class "
        f"token, linear stem, no head); got pool={v.pool!r} pre_norm={v.pre_norm} "
        f"num_prefix_tokens={v.num_prefix_tokens} stem={v.stem!r} num_classes={v.num_classes}")
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
  text.update(context_length=d.context_length, dtype=m.dtype, scan=m.scan, remat=m.remat)
  vision = {k: v for k, v in m.vision.items()}
  vision.update(image_size=d.image_size, dtype=m.dtype, scan=m.scan, remat=m.remat)
  return clip_lib.CLIPConfig(vision=ViTConfig(**vision), text=TextConfig(**text),
                             embed_dim=m.embed_dim, loss=m.loss)


def hf_config(cfg: clip_lib.CLIPConfig, base: dict | None = None, dtype: str = "float32") -> dict:
  """Our CLIPConfig -> a HF CLIPConfig dict (`base`, the imported one, keeps the
  fields that do not change the numbers)."""
  if cfg.loss != "softmax":
    raise ConversionError(f"model.loss={cfg.loss!r}: only softmax CLIP exports as CLIPModel "
                          f"(a SigLIP model needs SiglipModel, not supported)")
  t = cfg.text
  if t.pool == "argmax":
    eos = HF_ARGMAX_EOS
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


def prepare_export(params: dict, cfg: clip_lib.CLIPConfig) -> dict:
  del cfg
  return dict(params, vision=fold_patch_bias(params["vision"]))


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
