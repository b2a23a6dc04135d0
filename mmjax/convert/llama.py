"""transformers' LlamaForCausalLM <-> mmjax LLM (`mmjax.models.llm`, task "lm").

Names and layouts are listed in the `mmjax.models.llm` docstring: q/k/v
[N*H, D] -> [D, N, H] (GQA: K kv heads), o_proj -> [N, H, D], gate/up/down
and lm_head transposed. Both use the split-half RoPE, so no permutation.
Tied embeddings have no lm_head (HF files then omit it, or repeat the
embedding, which is ignored).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from mmjax.convert import common
from mmjax.convert.mapping import (ConversionError, Rule, attention_rules, dense_rules,
                                   norm_rules)
from mmjax.models import llm as llm_lib
from mmjax.models.llm import LLMConfig

ARCHITECTURES = ("LlamaForCausalLM",)
TASKS = ("lm",)
IGNORED = (r"rotary_emb\.inv_freq$",)


def rope_theta(t: dict, where: str) -> float:
  """rope_parameters (transformers 5) or rope_theta / rope_scaling (older files)."""
  params = t.get("rope_parameters") or {}
  scaling = t.get("rope_scaling") or {}
  for field, kind in (("rope_parameters.rope_type", params.get("rope_type")),
                      ("rope_scaling", scaling.get("rope_type") or scaling.get("type"))):
    if kind not in (None, "default"):
      raise ConversionError(f"{where}.{field}={kind!r}: only the default RoPE is supported "
                            f"(no {kind} frequency scaling)")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConversionError(f"{where}.rope_parameters.partial_rotary_factor="
                          f"{params['partial_rotary_factor']} is not supported")
  return float(params.get("rope_theta") or t.get("rope_theta") or 10000.0)


def llm_from_hf(t: dict, where: str = "config") -> dict[str, Any]:
  """HF LlamaConfig -> our model.llm dict (every architecture field explicit)."""
  if t.get("model_type", "llama") != "llama":
    raise ConversionError(f"{where}.model_type={t.get('model_type')!r}: only Llama LMs are "
                          f"supported")
  common.require(t, "hidden_act", "silu", where)
  common.require(t, "attention_bias", False, where)
  common.require(t, "mlp_bias", False, where)
  width, heads = int(t.get("hidden_size", 4096)), int(t.get("num_attention_heads", 32))
  kv = int(t.get("num_key_value_heads") or heads)
  head_dim = int(t.get("head_dim") or width // heads)
  if heads % kv:
    raise ConversionError(f"{where}.num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv}")
  out = dict(vocab_size=int(t.get("vocab_size", 32000)), width=width,
             depth=int(t.get("num_hidden_layers", 32)), num_heads=heads, num_kv_heads=kv,
             head_dim=head_dim if head_dim != width // heads else 0,
             mlp_dim=int(t.get("intermediate_size", 11008)),
             rope_theta=rope_theta(t, where), norm_eps=float(t.get("rms_norm_eps", 1e-6)),
             tie_embeddings=bool(t.get("tie_word_embeddings", False)))
  name = next((n for n, v in llm_lib.LLM_SIZES.items()
               if n != "tiny" and all(out.get(k) == val for k, val in v.items())), None)
  return {"size": name or "custom", **out}


def llm_to_hf(c: LLMConfig, base: dict | None = None) -> dict[str, Any]:
  """Our LLMConfig -> HF LlamaConfig fields (over `base`)."""
  out = dict(base or {})
  out.update({"vocab_size": c.vocab_size, "hidden_size": c.width, "num_hidden_layers": c.depth,
              "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
              "head_dim": c.head_size, "intermediate_size": c.mlp_dim, "hidden_act": "silu",
              "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
              "attention_bias": False, "mlp_bias": False, "model_type": "llama"})
  out.pop("rope_scaling", None)
  if "rope_parameters" in out or "rope_theta" not in out:
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta}
    out.pop("rope_theta", None)
  else:
    out["rope_theta"] = c.rope_theta
  out.setdefault("bos_token_id", 1)
  out.setdefault("eos_token_id", 2)
  out.setdefault("max_position_embeddings", 2048)
  return out


def llm_model_config(m, model) -> LLMConfig:
  """LLMConfig from the model.llm dict, as the lm / llava tasks build it."""
  llm = {k: v for k, v in m.items() if k != "size"}
  return llm_lib.llm_config(m["size"], dtype=model["dtype"], scan=model["scan"],
                            remat=model["remat"], **llm)


def llm_rules(c: LLMConfig, prefix: str, hf_model: str, hf_head: str) -> list[Rule]:
  """The LLM under `prefix` ("" or "llm/") <-> HF names under `hf_model`
  ("model", "model.language_model", ...) and the head `hf_head`."""
  layer, hl = f"{prefix}decoder/layers/block", f"{hf_model}.layers.{{i}}"
  rules = [
      Rule(f"{prefix}embed_tokens/embedding", f"{hf_model}.embed_tokens.weight"),
      *norm_rules(f"{layer}/norm1", f"{hl}.input_layernorm", c.depth, bias=False),
      *norm_rules(f"{layer}/norm2", f"{hl}.post_attention_layernorm", c.depth, bias=False),
      *attention_rules(f"{layer}/attn", f"{hl}.self_attn", c.depth, c.num_heads, c.head_size,
                       c.num_kv_heads, bias=False,
                       names=("q_proj", "k_proj", "v_proj", "o_proj")),
      *dense_rules(f"{layer}/mlp/gate", f"{hl}.mlp.gate_proj", c.depth, bias=False),
      *dense_rules(f"{layer}/mlp/up", f"{hl}.mlp.up_proj", c.depth, bias=False),
      *dense_rules(f"{layer}/mlp/down", f"{hl}.mlp.down_proj", c.depth, bias=False),
      *norm_rules(f"{prefix}norm", f"{hf_model}.norm", bias=False),
  ]
  if not c.tie_embeddings:
    rules += dense_rules(f"{prefix}lm_head", hf_head, bias=False)
  return rules


def tokenizer_data(tokenizer: str | None) -> dict[str, Any]:
  return {"tokenizer": os.path.abspath(tokenizer) if tokenizer else None}


# -- the family interface (see mmjax.convert) ---------------------------------

def workdir_config(hf: dict, src: str, tokenizer: str | None):
  del src
  llm = llm_from_hf(hf)
  model = {"llm": llm, "dtype": "float32", "scan": True, "remat": "none"}
  data = {**tokenizer_data(tokenizer), "seq_len": int(hf.get("max_position_embeddings", 2048))}
  return common.workdir_config("lm", model, data, {})


def ignored(cfg: LLMConfig) -> tuple[str, ...]:
  return IGNORED + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())


def model_config(config) -> LLMConfig:
  m = config.model
  return llm_model_config(m.llm.to_dict(), m.to_dict())


def build_model(cfg: LLMConfig):
  return llm_lib.LLM(cfg)


def init_args(cfg: LLMConfig) -> tuple:
  del cfg
  return (jnp.zeros((1, 8), jnp.int32),)


def rules(cfg: LLMConfig, layout=None) -> list[Rule]:
  del layout
  return llm_rules(cfg, "", "model", "lm_head")


def hf_config(cfg: LLMConfig, base: dict | None = None, dtype: str = "float32") -> dict:
  out = llm_to_hf(cfg, base)
  out.update({"architectures": list(ARCHITECTURES), "dtype": dtype})
  out.pop("torch_dtype", None)
  return out


def prepare_export(params: dict, cfg: LLMConfig) -> dict:
  del cfg
  return params
