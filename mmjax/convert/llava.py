"""transformers' LlavaForConditionalGeneration <-> mmjax LLaVA (`mmjax.models.llava`,
task "llava").

The vision tower is CLIP's (`convert.clip.vision_rules`), the LLM Llama's
(`convert.llama.llm_rules`); the projector is `multi_modal_projector.linear_{1,2}`.
Every key layout in use is read (see `layout`): the hub's
(`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head`), transformers 5's saved one (`vision_tower.*`) and the
in-memory one (`model.vision_tower.*`, `model.language_model.*`, `lm_head`).

Projectors: HF's is always Linear -> act -> Linear. `projector_hidden_act`
"gelu" (exact) is our `mlp2x_gelu` (LLaVA-1.5); "linear" (identity) is a single
affine map, our `linear` (LLaVA v1): imported as W2 W1 and W2 b1 + b2 (exact
when linear_2 is the identity) and exported with an identity linear_2.

HF's processor expands `<image>` into `image_seq_length` image tokens; our
model takes one `<image>` id per row and splices the features in itself.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from mmjax.convert import clip as clip_conv, common, llama
from mmjax.convert.mapping import ConversionError, Rule, dense_rules
from mmjax.models import llava as llava_lib
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("LlavaForConditionalGeneration",)
TASKS = ("llava",)
IGNORED = llama.IGNORED + clip_conv.IGNORED
HF_PROJECTOR_ACTS = {"gelu": "mlp2x_gelu", "linear": "linear"}

# Prefixes of the vision tower, projector, language model and head. Hub files
# (llava-hf/*) use HUB_LAYOUT; transformers 5 saves "vision_tower." without
# "vision_model."; its in-memory names start with "model.". Imports read
# whichever a file has and exports write the same one again (HUB_LAYOUT for
# models trained here).
HUB_LAYOUT = {"vision": "vision_tower.vision_model", "projector": "multi_modal_projector",
              "llm": "language_model.model", "head": "language_model.lm_head"}
_MARKERS = {"vision": "embeddings.class_embedding", "projector": "linear_1.weight",
            "llm": "embed_tokens.weight", "head": "lm_head.weight"}


def layout(keys) -> dict[str, str]:
  """The prefixes of a checkpoint's tensor names."""
  out = {}
  for part, marker in _MARKERS.items():
    found = sorted(k[:-len(marker)].rstrip(".") for k in keys if k.endswith(marker))
    if len(found) > 1:
      raise ConversionError(f"several {part} prefixes in one checkpoint: {found}")
    if found:
      out[part] = found[0] if part != "head" else found[0] + (".lm_head" if found[0] else
                                                               "lm_head")
  if "head" not in out:  # tied: the head's name only matters for export
    out["head"] = "lm_head" if out.get("llm", "").startswith("model.") else HUB_LAYOUT["head"]
  missing = sorted(set(_MARKERS) - set(out))
  if missing:
    raise ConversionError(f"the checkpoint has no {missing} tensors (looked for names ending "
                          f"in {[_MARKERS[m] for m in missing]})")
  return out


def config_from_hf(hf: dict) -> tuple[dict, dict]:
  v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
  if v.get("model_type", "clip_vision_model") != "clip_vision_model":
    raise ConversionError(f"vision_config.model_type={v.get('model_type')!r}: only a CLIP "
                          f"vision tower is supported")
  vision = clip_conv.vision_from_hf(v, "vision_config")
  vision["pool"] = "none"
  text = dict(t)
  # LlavaConfig copies a tied text config's flag to the top level; either ties.
  text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or t.get("tie_word_embeddings"))
  llm = llama.llm_from_hf(text, "text_config")
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConversionError(f"vision_feature_layer={layer!r}: only one feature layer (an int) is "
                          f"supported, not a concatenation of several")
  depth = v.get("num_hidden_layers", 24)
  if not -(depth + 1) <= layer <= depth:
    raise ConversionError(f"vision_feature_layer={layer} is outside the {depth + 1} hidden states")
  strategy = hf.get("vision_feature_select_strategy", "default")
  if strategy not in ("default", "full"):
    raise ConversionError(f"vision_feature_select_strategy={strategy!r} is not supported "
                          f"('default' or 'full')")
  act = hf.get("projector_hidden_act", "gelu")
  if act not in HF_PROJECTOR_ACTS:
    raise ConversionError(f"projector_hidden_act={act!r} is not supported; supported: "
                          f"{sorted(HF_PROJECTOR_ACTS)} (gelu = LLaVA-1.5's mlp2x_gelu)")
  common.require(hf, "multimodal_projector_bias", True, "config")
  image_token = hf.get("image_token_id", hf.get("image_token_index", 32000))
  model = {
      "vision": {k: val for k, val in vision.items() if k != "image_size"},
      "llm": llm,
      "projector": HF_PROJECTOR_ACTS[act],
      "feature_layer": layer,
      "keep_cls": strategy == "full",
      "image_token_id": int(image_token),
      "dtype": "float32",
      "scan": True,
      "remat": "none",
  }
  num_tokens = (vision["image_size"] // int(v.get("patch_size", 14))) ** 2 + (strategy == "full")
  seq = hf.get("image_seq_length")
  if seq is not None and seq != num_tokens:
    raise ConversionError(f"image_seq_length={seq} but the vision tower gives {num_tokens} "
                          f"image tokens")
  max_pos = int(t.get("max_position_embeddings", 4096))
  data = {"image_size": vision["image_size"],
          # Text tokens per example; the LLM sees max_len - 1 + image tokens.
          "max_len": max(64, min(max_pos, 2048) - num_tokens + 1)}
  return model, data


def model_config(config) -> llava_lib.LLaVAConfig:
  m, d = config.model, config.data
  vision = dict(m.vision.to_dict(), image_size=d.image_size, dtype=m.dtype, scan=m.scan,
                remat=m.remat)
  llm = llama.llm_model_config(m.llm.to_dict(), m.to_dict())
  return llava_lib.LLaVAConfig(vision=ViTConfig(**vision), llm=llm, projector=m.projector,
                               feature_layer=m.feature_layer, keep_cls=m.keep_cls,
                               image_token_id=m.image_token_id)


def hf_config(cfg: llava_lib.LLaVAConfig, base: dict | None = None,
              dtype: str = "float32") -> dict:
  base = dict(base or {})
  vision = dict(base.get("vision_config") or {})
  vision.update(clip_conv.vision_to_hf(dataclass_replace(cfg.vision, pool="cls")))
  text = llama.llm_to_hf(cfg.llm, base.get("text_config"))
  text.pop("architectures", None)
  if cfg.image_posemb or cfg.merge > 1:
    raise ConversionError("image_posemb and merge > 1 (not in LLaVA) have no transformers "
                          "equivalent")
  act = {v: k for k, v in HF_PROJECTOR_ACTS.items()}.get(cfg.projector)
  if act is None:
    raise ConversionError(f"projector={cfg.projector!r} has no transformers equivalent")
  base.pop("image_token_index", None)
  base.update({"architectures": list(ARCHITECTURES), "model_type": "llava", "dtype": dtype,
               "vision_config": vision, "text_config": text, "projector_hidden_act": act,
               "vision_feature_layer": cfg.feature_layer,
               "vision_feature_select_strategy": "full" if cfg.keep_cls else "default",
               "image_token_id": cfg.image_token_id, "image_seq_length": cfg.num_image_tokens,
               "multimodal_projector_bias": True,
               "tie_word_embeddings": cfg.llm.tie_embeddings})
  base.pop("torch_dtype", None)
  return base


def dataclass_replace(obj, **changes):
  import dataclasses
  return dataclasses.replace(obj, **changes)


def projector_rules(kind: str, width: int, hf: str) -> list[Rule]:
  if kind == "mlp2x_gelu":
    return [*dense_rules("projector/linear_1", f"{hf}.linear_1"),
            *dense_rules("projector/linear_2", f"{hf}.linear_2")]
  if kind != "linear":
    raise ConversionError(f"unknown projector {kind!r}")
  eye = lambda: np.eye(width, dtype=np.float32)  # noqa: E731
  w1, w2, b1, b2 = (f"{hf}.linear_1.weight", f"{hf}.linear_2.weight", f"{hf}.linear_1.bias",
                    f"{hf}.linear_2.bias")
  return [
      Rule("projector/linear_1/kernel", (w1, w2),
           lambda a, b: (b.astype(np.float32) @ a.astype(np.float32)).T,
           lambda k: (k.T, eye())),
      Rule("projector/linear_1/bias", (b1, w2, b2),
           lambda a, w, b: w.astype(np.float32) @ a.astype(np.float32) + b,
           lambda x: (x, None, np.zeros(width, np.float32))),
  ]


# -- the family interface (see mmjax.convert) ---------------------------------

def workdir_config(hf: dict, src: str, tokenizer: str | None):
  model, data = config_from_hf(hf)
  data["transforms"] = common.preprocessing(src, data["image_size"], pad_default=True)
  data.update(llama.tokenizer_data(tokenizer), template="vicuna_v1", system_prompt=None)
  config = common.workdir_config("llava", model, data, {})
  config.stage = 2
  return config


def ignored(cfg: llava_lib.LLaVAConfig) -> tuple[str, ...]:
  return IGNORED + ((r"lm_head\.weight$",) if cfg.llm.tie_embeddings else ())


def build_model(cfg: llava_lib.LLaVAConfig):
  return llava_lib.LLaVA(cfg)


def init_args(cfg: llava_lib.LLaVAConfig) -> tuple:
  s = cfg.vision.image_size
  ids = jnp.zeros((1, 4), jnp.int32).at[:, 1].set(cfg.image_token_id)
  return jnp.zeros((1, s, s, 3), jnp.float32), ids


def rules(cfg: llava_lib.LLaVAConfig, layout: dict | None = None) -> list[Rule]:
  layout = layout.to_dict() if hasattr(layout, "to_dict") else dict(layout or {})
  p = dict(HUB_LAYOUT, **layout)
  return [*clip_conv.vision_rules(cfg.vision, "vision", p["vision"]),
          *projector_rules(cfg.projector, cfg.llm.width, p["projector"]),
          *llama.llm_rules(cfg.llm, "llm/", p["llm"], p["head"])]


def prepare_export(params: dict, cfg: llava_lib.LLaVAConfig) -> dict:
  del cfg
  return dict(params, vision=clip_conv.fold_patch_bias(params["vision"]))
