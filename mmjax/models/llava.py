"""LLaVA: a CLIP vision tower, a projector, and a decoder LLM; the projected image
features replace the `<image>` placeholder of the token sequence.

The token sequence holds ONE `<image>` id per row (or none: a text-only row).
`splice_plan` maps it to an embedded sequence of static length
T' = T - 1 + N (N image tokens): positions before the placeholder take text
tokens, the next N take the image features, the rest the remaining text; a row
without an image keeps its text and ends in N - 1 padding slots. Positions
count only valid slots, so left- and right-padded rows both start at 0, and the
attention mask is causal over the valid slots of each row, wherever its image
token sits. Everything has static shapes (gathers), so it jits once.

Params: vision/... (a `ViT`, the tree of CLIP's `vision` so a CLIP checkpoint
loads as is), projector/linear_1[, linear_2] (transformers'
`multi_modal_projector.linear_{1,2}`), llm/... (`mmjax.models.llm.LLM`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers, llm as llm_lib, vit as vit_lib
from mmjax.models.llm import LLM, LLMConfig
from mmjax.models.vit import ViT, ViTConfig

PROJECTORS = ("linear", "mlp2x_gelu")


@dataclasses.dataclass(frozen=True)
class LLaVAConfig:
  vision: ViTConfig = ViTConfig(variant="L/14", image_size=336, pre_norm=True, norm_eps=1e-5,
                                act="quick_gelu", pool="none")
  llm: LLMConfig = LLMConfig()
  projector: str = "mlp2x_gelu"  # linear (LLaVA v1) | mlp2x_gelu (v1.5)
  feature_layer: int = -2  # index into hidden_states [L + 1]: -2 = penultimate block
  keep_cls: bool = False  # transformers' vision_feature_select_strategy "full" vs "default"
  # Not in LLaVA: a learned position embedding added to the projected patch
  # tokens (`projector/pos_embed`, initialised with 2-D sin-cos). For small
  # towers whose contrastive training left little position in their features.
  image_posemb: bool = False
  # Not in LLaVA either: k x k neighbouring patch tokens concatenated into one
  # (InternVL's pixel unshuffle), k**2 fewer image tokens of k**2 times the
  # width. Prefix tokens (keep_cls) are not supported with it.
  merge: int = 1
  image_token_id: int = 4
  pad_id: int = 0

  @property
  def grid(self) -> int:
    """Side of the image-token grid that the LLM sees."""
    side = int(round(self.vision.num_patches ** 0.5))
    if self.merge < 1 or side % self.merge:
      raise ValueError(f"merge={self.merge} must divide the {side} x {side} patch grid")
    return side // self.merge

  @property
  def num_image_tokens(self) -> int:
    return self.grid ** 2 + (self.vision.num_prefix_tokens if self.keep_cls else 0)


def forward_flops(cfg: LLaVAConfig, text_len: int) -> tuple[float, float, float]:
  """(vision tower, projector, LLM) forward FLOPs of one example."""
  n = cfg.num_image_tokens
  d_v, d = cfg.vision.size["width"] * cfg.merge ** 2, cfg.llm.width
  proj = 2 * n * d_v * d + (2 * n * d * d if cfg.projector == "mlp2x_gelu" else 0)
  # The head at the text_len - 1 slots that predict a text token
  # (LLaVA.next_token_logits).
  return (vit_lib.forward_flops(cfg.vision), proj,
          llm_lib.forward_flops(cfg.llm, text_len - 1 + n, head_positions=text_len - 1))


class Projector(nn.Module):
  """Vision width -> LLM width: one Linear, or Linear -> GELU (exact) -> Linear;
  with `grid`, plus a learned position embedding of the grid x grid patch
  tokens (the last grid**2 tokens; prefix tokens get none)."""

  kind: str
  width: int
  dtype: str = "float32"
  grid: int = 0  # 0: no position embedding

  @nn.compact
  def __call__(self, x):
    dtype = jnp.dtype(self.dtype)
    dense = lambda names, name: nn.Dense(
        self.width, dtype=dtype, name=name, dot_general=layers.dense_dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))
    if self.kind == "linear":
      y = dense((None, "embed"), "linear_1")(x)
    elif self.kind == "mlp2x_gelu":
      h = dense((None, "mlp"), "linear_1")(x)
      h = layers.activation("gelu")(h)  # exact erf GELU, as torch's nn.GELU()
      y = dense(("mlp", "embed"), "linear_2")(h)
    else:
      raise ValueError(f"unknown projector {self.kind!r}; choose one of {PROJECTORS}")
    if not self.grid:
      return y
    posemb = self.param("pos_embed", nn.with_logical_partitioning(
        lambda _, shape: layers.sincos_2d(self.grid, shape[1]), (None, "embed")),
        (self.grid ** 2, self.width))
    prefix = y.shape[1] - self.grid ** 2
    return y.at[:, prefix:].add(posemb.astype(y.dtype))


def merge_tokens(x: jax.Array, k: int) -> jax.Array:
  """[B, (g k)^2, D] row-major grid tokens -> [B, g^2, k^2 D]: each k x k block
  of neighbours becomes one token, its channels ordered (row, column, D)."""
  b, n, d = x.shape
  side = int(round(n ** 0.5))
  g = side // k
  x = x.reshape(b, g, k, g, k, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * g, k * k * d)


def splice_plan(ids: jax.Array, image_token_id: int, num_image_tokens: int,
                padding: jax.Array | None = None) -> dict[str, jax.Array]:
  """Where each slot of the expanded [B, T - 1 + N] sequence comes from.

  Returns text_index (the source text position; -1 at image slots and at the
  trailing slots of rows without an image), patch_index (the image feature; -1
  elsewhere) and valid (False at padding).
  """
  b, t = ids.shape
  n = num_image_tokens
  total = t - 1 + n
  if padding is None:
    padding = jnp.ones((b, t), bool)
  is_image = ids == image_token_id
  has_image = jnp.any(is_image, axis=1)  # [B]
  k = jnp.where(has_image, jnp.argmax(is_image, axis=1), t)  # placeholder position
  j = jnp.arange(total)[None, :]  # [1, T']
  k = k[:, None]
  in_image = has_image[:, None] & (j >= k) & (j < k + n)
  before = j < k
  text_index = jnp.where(before, j, jnp.where(in_image, -1, j - n + 1))
  text_index = jnp.where(~has_image[:, None] & (j >= t), -1, text_index)
  patch_index = jnp.where(in_image, j - k, -1)
  text_valid = jnp.take_along_axis(padding, jnp.clip(text_index, 0, t - 1), axis=1)
  valid = in_image | ((text_index >= 0) & text_valid.astype(bool))
  return {"text_index": text_index, "patch_index": patch_index, "valid": valid,
          "image_start": k[:, 0]}


def text_predecessors(plan: dict[str, jax.Array], text_len: int,
                      num_image_tokens: int) -> jax.Array:
  """[B, T - 1]: for text positions i = 1 .. T - 1, the slot of the expanded
  sequence just before token i's slot, i.e. the slot whose logits predict
  token i (the last image slot for the token after the placeholder). At the
  placeholder itself (no slot of its own) the value is unused."""
  i = jnp.arange(1, text_len)[None, :]
  start = plan["image_start"][:, None]  # text_len where a row has no image
  return jnp.where(i < start, i, i + num_image_tokens - 1) - 1


def splice_labels(labels: jax.Array, plan: dict[str, jax.Array],
                  ignore_index: int = -100) -> jax.Array:
  """Text labels [B, T] -> labels of the expanded sequence (ignored at image slots)."""
  idx = plan["text_index"]
  gathered = jnp.take_along_axis(labels, jnp.clip(idx, 0, labels.shape[1] - 1), axis=1)
  return jnp.where((idx >= 0) & plan["valid"], gathered, ignore_index)


def splice_embeddings(text_embeds: jax.Array, image_embeds: jax.Array,
                      plan: dict[str, jax.Array]) -> jax.Array:
  """[B, T, D] text and [B, N, D] image embeddings -> [B, T - 1 + N, D]."""
  t, n = text_embeds.shape[1], image_embeds.shape[1]
  text = jnp.take_along_axis(text_embeds, jnp.clip(plan["text_index"], 0, t - 1)[..., None], 1)
  image = jnp.take_along_axis(image_embeds.astype(text.dtype),
                              jnp.clip(plan["patch_index"], 0, n - 1)[..., None], 1)
  out = jnp.where((plan["patch_index"] >= 0)[..., None], image, text)
  return jnp.where(plan["valid"][..., None], out, jnp.zeros_like(out))


class LLaVA(nn.Module):
  """`__call__(images, ids)` -> (logits [B, T - 1 + N, V], out with the plan)."""

  config: LLaVAConfig

  def setup(self):
    cfg = self.config
    self.vision = ViT(cfg.vision, collect_hidden=True)
    if cfg.merge > 1 and cfg.keep_cls:
      raise ValueError("merge > 1 needs keep_cls=False")
    self.projector = Projector(cfg.projector, cfg.llm.width, cfg.llm.dtype,
                               cfg.grid if cfg.image_posemb else 0)
    self.llm = LLM(cfg.llm)

  def image_features(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> projected features [B, N, D_llm] of the chosen layer."""
    cfg = self.config
    _, out = self.vision(images)
    hidden = out["hidden_states"][cfg.feature_layer]  # [B, P + N, D_vision], no final norm
    if not cfg.keep_cls:
      hidden = hidden[:, cfg.vision.num_prefix_tokens:]
    if cfg.merge > 1:
      hidden = merge_tokens(hidden, cfg.merge)
    return self.projector(hidden)

  def embed_inputs(self, images: jax.Array, ids: jax.Array,
                   padding: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(embeddings [B, T', D], plan) with the image features spliced in."""
    cfg = self.config
    if padding is None:
      padding = ids != cfg.pad_id
    plan = splice_plan(ids, cfg.image_token_id, cfg.num_image_tokens, padding)
    embeds = splice_embeddings(self.llm.embed(ids), self.image_features(images), plan)
    return embeds, plan

  def __call__(self, images: jax.Array, ids: jax.Array, padding: jax.Array | None = None):
    embeds, plan = self.embed_inputs(images, ids, padding)
    logits, _ = self.llm(embeddings=embeds, padding=plan["valid"])
    return logits, {"plan": plan}

  def next_token_logits(self, images: jax.Array, ids: jax.Array,
                        padding: jax.Array | None = None):
    """(logits [B, T - 1, V] predicting ids[:, 1:], out): the training loss's
    logits. The output head runs only at the T - 1 slots that precede a text
    token, not at all T - 1 + N (no label is ever at an image slot): N / (T - 1
    + N) of the head's and the softmax's work saved. out["target_valid"]
    [B, T - 1] is False where ids[:, 1:] is the placeholder or padding."""
    cfg = self.config
    if padding is None:
      padding = ids != cfg.pad_id
    embeds, plan = self.embed_inputs(images, ids, padding)
    at = text_predecessors(plan, ids.shape[1], cfg.num_image_tokens)
    logits, _ = self.llm(embeddings=embeds, padding=plan["valid"], logits_at=at)
    target = jnp.arange(1, ids.shape[1])[None, :]
    valid = padding[:, 1:] & (target != plan["image_start"][:, None])
    return logits, {"plan": plan, "target_valid": valid}
