"""The CLIP family's Task: contrastive image-text pretraining with CLIP's
softmax InfoNCE or SigLIP's sigmoid loss (`model.loss`), plain or chunked over
the devices (`model.chunked_loss`); zero-shot and retrieval evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax import collective_losses, losses, parallel
from mmjax.data import pipeline
from mmjax.eval import clip as clip_eval
from mmjax.eval import sharded
from mmjax.models import clip as clip_lib
from mmjax.models.text import TextConfig
from mmjax.models.vit import ViTConfig
from mmjax.train.tasks.base import dataclass_from, register, with_shardings


def token_ids(text_cfg, tokenizer) -> dict[str, int]:
  """The text tower's vocabulary size, EOS and pad ids: the config's where it
  sets them (an imported checkpoint names the EOS its tower pools at), else the
  tokenizer's (model.text.vocab_size 0: "the tokenizer's")."""
  return dict(vocab_size=text_cfg.get("vocab_size") or tokenizer.vocab_size,
              eos_id=text_cfg.get("eos_id", tokenizer.eos_id),
              pad_id=text_cfg.get("pad_id", tokenizer.pad_id))


@register("clip")
class CLIPTask:
  """Contrastive image-text pretraining (softmax InfoNCE or SigLIP)."""

  batch_keys = ("image", "text")

  def __init__(self, config, with_data: bool = True):
    """with_data=False: from the config alone, no tokenizer or dataset (AOT
    planning); the vocabulary size is then model.text.vocab_size."""
    self.config = config
    self.data_cfg = config.data
    m = config.model
    self.tokenizer = pipeline.dataset_tokenizer(config.data) if with_data else None
    if self.tokenizer is not None:
      ids = token_ids(m.text, self.tokenizer)
    elif m.text.get("vocab_size"):
      ids = dict(vocab_size=m.text.vocab_size)
    else:
      raise ValueError("CLIPTask without data needs --config.model.text.vocab_size "
                       "(49408 for OpenAI's BPE)")
    text_cfg = dataclass_from(
        TextConfig, m.text, **ids, context_length=config.data.context_length,
        dtype=m.dtype, scan=m.scan, remat=m.remat)
    vision_cfg = dataclass_from(ViTConfig, m.vision, image_size=config.data.image_size,
                                 dtype=m.dtype, scan=m.scan, remat=m.remat)
    self.model_config = clip_lib.CLIPConfig(vision=vision_cfg, text=text_cfg,
                                            embed_dim=m.embed_dim, loss=m.loss)
    self.model = clip_lib.CLIP(self.model_config)
    self.frozen = tuple((config.get("optim") or {}).get("frozen", ()) or ())
    self._build_eval_fns()

  def init(self, rng):
    s, t = self.data_cfg.image_size, self.data_cfg.context_length
    return self.model.init(rng, jnp.zeros((1, s, s, 3)), jnp.zeros((1, t), jnp.int32))["params"]

  def initial_params(self, params, shardings):
    """`init.clip_workdir`: start from all params of another CLIP workdir (a run,
    or one written by `python -m mmjax.convert`) whose model matches this one."""
    source = (self.config.get("init") or {}).get("clip_workdir")
    if not source:
      return params
    from mmjax import checkpoint
    return checkpoint.restore_subtree(source, ("params",), with_shardings(params, shardings))

  def batch_spec(self, batch_size: int) -> dict:
    s, t = self.data_cfg.image_size, self.data_cfg.context_length
    return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, t), jnp.int32)}

  def loss(self, params, batch, rng):
    del rng
    out = self.model.apply({"params": params}, batch["image"], batch["text"])
    chunked = self.config.model.get("chunked_loss", False)  # B x B logits split over devices
    if self.model_config.loss == "sigmoid":
      fn = collective_losses.chunked_siglip_loss if chunked else losses.siglip_loss
      loss, _ = fn(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                   out["logit_bias"])
    else:
      fn = collective_losses.chunked_clip_softmax_loss if chunked else losses.clip_softmax_loss
      loss, _ = fn(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    aux = {"temperature": 1.0 / out["logit_scale"], "logit_scale": out["logit_scale"]}
    if "logit_bias" in out:
      aux["logit_bias"] = out["logit_bias"]
    return loss, aux

  def flops_per_example(self) -> float:
    """Training FLOPs per pair: 3 x forward (a frozen tower would count once)."""
    return 3 * clip_lib.forward_flops(self.model_config, self.config.batch_size)

  def train_batches(self, batch_size: int, seed: int, **shard):
    """shard: shard_index / shard_count (default: this process of all processes)."""
    return pipeline.train_iterator(self.data_cfg, tokenizer=self.tokenizer,
                                   batch_size=batch_size, seed=seed, **shard)

  # -- evaluation ---------------------------------------------------------

  def _build_eval_fns(self):
    """The jitted eval functions (params, global batch) -> per-row outputs."""
    model = self.model

    def embed_batch(p, b):
      return {"image": model.apply({"params": p}, b["image"], method=clip_lib.CLIP.encode_image),
              "text": model.apply({"params": p}, b["text"], method=clip_lib.CLIP.encode_text),
              "label": b["label"], "num_objects": b["num_objects"]}

    self._embed_batch = jax.jit(embed_batch)
    self._embed_text = jax.jit(lambda p, b: {"text": model.apply(
        {"params": p}, b["text"], method=clip_lib.CLIP.encode_text)})

  def evaluate(self, params, mesh, rules) -> dict[str, float]:
    cfg = self.config
    per_process = cfg.eval.batch_size // jax.process_count()
    with parallel.activate(mesh, rules):
      batches = pipeline.eval_iterator(self.data_cfg, tokenizer=self.tokenizer,
                                       split=self.data_cfg.eval_split, batch_size=per_process)
      emb = clip_eval.embed_split(lambda b: self._embed_batch(params, b), batches, mesh)
      class_emb = None
      if cfg.eval.zeroshot:
        names = pipeline.class_names(self.data_cfg)
        embed_texts = lambda ids: sharded.run_rows(  # noqa: E731
            lambda b: self._embed_text(params, b), {"text": ids}, cfg.eval.batch_size,
            mesh)["text"]
        class_emb = clip_eval.class_embeddings(
            embed_texts, self.tokenizer, names, pipeline.prompt_templates(self.data_cfg),
            self.data_cfg.context_length)
    return clip_eval.evaluate(emb, class_emb, pipeline.held_out_labels(self.data_cfg))
