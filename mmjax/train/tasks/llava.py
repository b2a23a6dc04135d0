"""The LLaVA family's Tasks: "lm" (decoder LM pretraining on text) and "llava"
(stage 1: align the projector; stage 2: instruction tuning). Both run on the
shared step and loop; they differ in their loss, their frozen params and their
data (the protocol: `mmjax.train.tasks.base.Task`).

Later stages start from earlier runs through `initial_params`: `init.clip_workdir`
(the vision tower: a CLIP run's params/vision), `init.lm_workdir` (the LLM: an
"lm" run's params) and `init.stage1_workdir` (vision, projector and LLM of a
stage-1 run), each the latest checkpoint of that workdir.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import checkpoint, losses, parallel
from mmjax.data import instruct, packing, pipeline, transforms
from mmjax.data import llava as llava_data
from mmjax.eval import generate as generate_lib
from mmjax.eval import sharded, vqa
from mmjax.models import attention
from mmjax.models import llava as llava_lib
from mmjax.models import llm as llm_lib
from mmjax.models.vit import ViTConfig
from mmjax.train.tasks.base import dataclass_from, register, with_shardings


# ---------------------------------------------------------------------------
# "lm": decoder LM pretraining on packed text


@register("lm")
class LMTask:
  """Next-token prediction on the text of the instruction data (captions,
  questions and answers, without images), documents packed into rows."""

  batch_keys = ("tokens", "labels", "segments", "positions")

  def __init__(self, config, with_data: bool = True):
    vocab = _read_data(self, config, with_data)
    self.model_config = _llm_config(config.model, vocab)
    self.model = llm_lib.LLM(self.model_config)
    self.seq_len = int(config.data.seq_len)
    self.frozen = tuple(config.optim.get("frozen", ()) or ())
    self._eval_sums = jax.jit(self.eval_sums)
    self._grounded_fn = jax.jit(self.grounded_rows)

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

  def batch_spec(self, batch_size: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.int32)
            for k in self.batch_keys}

  def loss(self, params, batch, rng):
    del rng
    segments = batch["segments"]
    mask = attention.AttentionMask(kv_valid=segments > 0, segment_ids=segments, causal=True)
    logits, _ = self.model.apply({"params": params}, batch["tokens"],
                                 positions=batch["positions"], mask=mask)
    loss, count = losses.next_token_loss(logits, losses.shift_labels(batch["labels"]))
    return loss, {"tokens": count.astype(jnp.float32)}

  def flops_per_example(self) -> float:
    return 3 * llm_lib.forward_flops(self.model_config, self.seq_len)

  def _documents(self, split: str) -> list[np.ndarray]:
    """Tokenised documents; for training, each file's records weighted by
    `data.lm_weights` (w: every record int(w) times, then the first frac(w) of
    them once more)."""
    cfg, json_path = self.data_cfg, llava_data.json_path
    if split == "train":
      files = [("captions", json_path(cfg, "caption_json_path", "captions.json"), "plain"),
               ("instruct", json_path(cfg, "json_path", "instruct.json"), cfg.template)]
      # The scenes described in words (mmjax.data.instruct's grounded.json).
      grounded = llava_data.optional_path(cfg, "grounded_json_path", "grounded.json")
      if grounded:
        files.append(("grounded", grounded, cfg.template))
    else:
      files = [("captions", json_path(cfg, "caption_eval_json_path", "captions_eval.json"),
                "plain"),
               ("instruct", json_path(cfg, "eval_json_path", "vqa_eval.json"), cfg.template)]
    weights = dict(cfg.get("lm_weights") or {}) if split == "train" else {}
    if set(weights) - {name for name, _, _ in files}:
      raise ValueError(f"data.lm_weights names {sorted(weights)}; the LM's files are "
                       f"{[name for name, _, _ in files]}")
    docs = []
    for name, path, template_name in files:
      template = instruct.get_template(template_name, cfg.get("system_prompt")
                                       if template_name != "plain" else None)
      toks = [instruct.tokenize(r["conversations"], self.tokenizer, template,
                                max_len=self.seq_len, sample_id=r.get("id", "?"))[0]
              for r in instruct.load_json(path)]
      w = float(weights.get(name, 1.0))
      docs += toks * int(w) + toks[:round((w - int(w)) * len(toks))]
    return docs

  def train_batches(self, batch_size: int, seed: int, shard_index: int | None = None,
                    shard_count: int | None = None):
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    docs = self._documents("train")[shard_index::shard_count]
    return packing.PackedText(docs, batch_size, self.seq_len, seed=seed + 1000 * shard_index,
                      pad_id=self.tokenizer.pad_id)

  # -- evaluation -------------------------------------------------------------

  def eval_sums(self, params, batch) -> dict[str, jax.Array]:
    """The next-token loss summed over the labelled tokens of the real rows, and their count."""
    labels = jnp.where(batch["mask"][:, None], batch["labels"], losses.IGNORE_INDEX)
    loss, aux = self.loss(params, {**batch, "labels": labels}, None)
    return {"sum": loss * aux["tokens"], "count": aux["tokens"]}

  def grounded_rows(self, params, batch) -> dict[str, jax.Array]:
    """Per row: is every answer token the argmax given the ones before it."""
    tokens = batch["tokens"]
    pad = self.tokenizer.pad_id
    valid = jnp.arange(tokens.shape[1])[None] < jnp.sum(tokens != pad, axis=1)[:, None]
    logits, _ = self.model.apply({"params": params}, tokens, padding=valid)  # right-padded
    return {"right": greedy_exact(logits, batch["labels"])}

  @functools.cached_property
  def eval_documents(self) -> dict[str, np.ndarray]:
    """Every eval document once, packed into rows."""
    return packing.pack_all(self._documents("eval"), self.seq_len, self.tokenizer.pad_id)

  @functools.cached_property
  def grounded_eval(self) -> tuple[list[dict], dict[str, np.ndarray]] | None:
    """(records, {tokens, labels}) of grounded_eval.json; None without the file."""
    cfg = self.data_cfg
    path = llava_data.optional_path(cfg, "grounded_eval_json_path", "grounded_eval.json")
    if not path:
      return None
    records = instruct.load_json(path)
    template = instruct.get_template(cfg.template, cfg.get("system_prompt"))
    rows = [instruct.tokenize(r["conversations"], self.tokenizer, template,
                              max_len=self.seq_len, sample_id=r["id"]) for r in records]
    pad = self.tokenizer.pad_id
    return records, {
        "tokens": np.stack([instruct.pad_to(t, self.seq_len, pad) for t, _ in rows]),
        "labels": np.stack([instruct.pad_to(l, self.seq_len, instruct.IGNORE_INDEX)
                            for _, l in rows])}

  def evaluate(self, params, mesh, rules) -> dict[str, float]:
    bs = int(self.config.eval.batch_size)
    with parallel.activate(mesh, rules):
      out = sharded.run_rows(lambda b: self._eval_sums(params, b), self.eval_documents, bs,
                             mesh)
      loss = out["sum"] / max(out["count"], 1.0)
      metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
      if self.grounded_eval is not None:
        # Held-out questions answered from the scene's description: right when
        # greedy decoding would write exactly the labelled answer.
        records, rows = self.grounded_eval
        right = sharded.run_rows(lambda b: self._grounded_fn(params, b), rows, bs, mesh)["right"]
        metrics.update(vqa.by_type(right, [r.get("question_type", "all") for r in records],
                                   "grounded_accuracy"))
    return metrics


def greedy_exact(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] True where the argmax at every labelled position is its label (logits
  [B, T, V] at t predict labels [B, T] at t + 1; negative labels are ignored):
  greedy decoding from the prompt would write exactly the labelled answer."""
  hit = (jnp.argmax(logits[:, :-1], -1) == labels[:, 1:]) | (labels[:, 1:] < 0)
  return jnp.all(hit, axis=1)


def _sum_loss(task: LMTask, params, batch):
  loss, aux = task.loss(params, batch, None)
  return loss * aux["tokens"], aux["tokens"]


def _read_data(task, config, with_data: bool) -> int:
  """Sets task.config, .data_cfg and .tokenizer (None without data); returns the
  LLM's vocabulary size (the config's, else the tokenizer's)."""
  task.config = config
  task.data_cfg = llava_data.resolve_data(config.data) if with_data else config.data
  task.tokenizer = llava_data.load_tokenizer(task.data_cfg) if with_data else None
  vocab = config.model.llm.get("vocab_size") or (
      task.tokenizer.vocab_size if task.tokenizer else 0)
  if not vocab:
    raise ValueError(f"{type(task).__name__} without data needs --config.model.llm.vocab_size")
  return vocab


def _llm_config(m, vocab: int) -> llm_lib.LLMConfig:
  overrides = {k: v for k, v in m.llm.to_dict().items() if k not in ("size", "vocab_size")}
  return llm_lib.llm_config(m.llm.size, vocab_size=vocab, dtype=m.dtype, scan=m.scan,
                            remat=m.remat, **overrides)


# ---------------------------------------------------------------------------
# "llava": stage 1 (align) and stage 2 (instruction tuning)


@register("llava")
class LLaVATask:
  """Stage 1 (`stage=1`, template "plain", captions): only the projector trains.
  Stage 2 (`stage=2`, template vicuna_v1, instructions): projector and LLM train.
  Which params train is the config's `optim.frozen` list."""

  batch_keys = ("image", "tokens", "labels")

  def __init__(self, config, with_data: bool = True):
    self.stage = int(config.stage)
    vocab = _read_data(self, config, with_data)
    m = config.model
    vision = dataclass_from(ViTConfig, m.vision, image_size=config.data.image_size,
                                   dtype=m.dtype, scan=m.scan, remat=m.remat)
    self.model_config = llava_lib.LLaVAConfig(
        vision=vision, llm=_llm_config(m, vocab), projector=m.projector,
        feature_layer=m.feature_layer, keep_cls=m.keep_cls, image_token_id=m.image_token_id,
        image_posemb=bool(m.get("image_posemb", False)), merge=int(m.get("merge", 1)),
        pad_id=self.tokenizer.pad_id if self.tokenizer else 0)
    self.model = llava_lib.LLaVA(self.model_config)
    self.max_len = int(config.data.max_len)
    self.frozen = tuple(config.optim.get("frozen", ()) or ())
    self.template = llava_data.template(self.data_cfg)
    model = self.model
    self._caption_fn = jax.jit(self.caption_sums)
    self._embed = jax.jit(lambda p, img, ids: model.apply(
        {"params": p}, img, ids, method=llava_lib.LLaVA.embed_inputs))
    self._generators: dict[int, Any] = {}  # max_new_tokens -> jitted decoder

  # -- model ----------------------------------------------------------------

  def _dummy_inputs(self, batch: int = 1):
    s = self.config.data.image_size
    ids = jnp.zeros((batch, self.max_len), jnp.int32).at[:, 1].set(self.model_config.image_token_id)
    return jnp.zeros((batch, s, s, 3), jnp.float32), ids

  def init(self, rng):
    return self.model.init(rng, *self._dummy_inputs())["params"]

  def batch_spec(self, batch_size: int) -> dict:
    s = self.config.data.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((batch_size, self.max_len), jnp.int32),
            "labels": jax.ShapeDtypeStruct((batch_size, self.max_len), jnp.int32)}

  def loss(self, params, batch, rng):
    del rng
    # Logits only where a text token is predicted (LLaVA.next_token_logits).
    logits, out = self.model.apply({"params": params}, batch["image"], batch["tokens"],
                                   method=llava_lib.LLaVA.next_token_logits)
    labels = jnp.where(out["target_valid"], batch["labels"][:, 1:], losses.IGNORE_INDEX)
    loss, count = losses.next_token_loss(logits, labels)
    return loss, {"tokens": count.astype(jnp.float32)}

  def flops_per_example(self) -> float:
    vision, proj, lm = llava_lib.forward_flops(self.model_config, self.max_len)
    # The frozen tower runs forward only; a frozen LLM still back-propagates to
    # its inputs (about one more forward) so that the projector gets gradients.
    lm_factor = 3 if self.stage >= 2 else 2
    return vision + 3 * proj + lm_factor * lm

  # -- data -----------------------------------------------------------------

  def _example_fn(self) -> llava_data.LlavaExample:
    t = self.data_cfg.transforms
    return llava_data.LlavaExample(self.tokenizer, self.template, self.max_len,
                                   self.data_cfg.image_size, t.normalize, bool(t.pad_to_square))

  def train_batches(self, batch_size: int, seed: int, **shard):
    cfg = ml_collections.ConfigDict(self.data_cfg.to_dict())
    default = "captions.json" if self.stage == 1 else "instruct.json"
    cfg.json_path = llava_data.json_path(self.data_cfg, "json_path", default)
    cfg.name = "llava"
    return pipeline.train_iterator(cfg, tokenizer=self.tokenizer, batch_size=batch_size,
                                   seed=seed, example_fn=self._example_fn(), **shard)

  # -- starting from earlier runs ---------------------------------------------

  def initial_params(self, params, shardings):
    init = self.config.get("init") or {}
    params = dict(params)
    sources = []  # (workdir, saved sub-tree, our sub-tree, skip saved params we lack)
    if init.get("stage1_workdir"):
      sources += [(init.stage1_workdir, k, k, False) for k in ("vision", "projector", "llm")]
    if init.get("clip_workdir"):
      # LLaVA reads the tower's tokens: a CLIP pooling head (map_head) stays behind.
      sources.append((init.clip_workdir, "vision", "vision", True))
    if init.get("lm_workdir"):
      sources.append((init.lm_workdir, None, "llm", False))
    for workdir, src, dst, ignore_extra in sources:
      path = ("params",) + ((src,) if src else ())
      target = with_shardings(params[dst], shardings[dst])
      params[dst] = checkpoint.restore_subtree(workdir, path, target, ignore_extra=ignore_extra)
      logging.info("loaded params/%s from %s (%s)", dst, workdir, "/".join(path))
    if not sources:
      logging.warning("llava stage %d starts from random weights: set init.clip_workdir, "
                      "init.lm_workdir or init.stage1_workdir", self.stage)
    return params

  # -- evaluation -------------------------------------------------------------

  def evaluate(self, params, mesh, rules) -> dict[str, float]:
    """Stage 1: the caption loss of held-out captions, with and without the
    image (`eval_at_start` logs it for the untrained projector at step 0).
    Stage 2: exact-match VQA accuracy on held-out questions."""
    with parallel.activate(mesh, rules):
      if self.stage == 1:
        return self.caption_loss(params, mesh)
      return self.vqa(params, mesh)

  def caption_sums(self, params, batch) -> dict[str, jax.Array]:
    """Loss sums and token counts of the real rows, with the image and without
    (its tokens replaced by padding)."""
    labels = jnp.where(batch["mask"][:, None], batch["labels"], losses.IGNORE_INDEX)
    out = {}
    for name, blind in (("caption", False), ("no_image", True)):
      tokens = batch["tokens"]
      if blind:
        tokens = jnp.where(tokens == self.model_config.image_token_id, self.tokenizer.pad_id,
                           tokens)
      loss, aux = self.loss(params, {**batch, "tokens": tokens, "labels": labels}, None)
      out[f"{name}_sum"], out[f"{name}_count"] = loss * aux["tokens"], aux["tokens"]
    return out

  @functools.cached_property
  def caption_eval(self) -> dict[str, np.ndarray]:
    """The held-out captions in stage 1's format: {image, tokens, labels} rows."""
    cfg = self.data_cfg
    path = llava_data.json_path(cfg, "caption_eval_json_path", "captions_eval.json")
    records = instruct.load_json(path)[:int(self.config.eval.get("num_captions", 256))]
    fn = llava_data.LlavaExample(self.tokenizer, instruct.get_template("plain"), self.max_len,
                                 cfg.image_size, cfg.transforms.normalize,
                                 bool(cfg.transforms.pad_to_square))
    rows = [fn.make(llava_data.read_image(cfg, r["image"]), r["conversations"], r["id"])
            for r in records]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def caption_loss(self, params, mesh) -> dict[str, float]:
    out = sharded.run_rows(lambda b: self._caption_fn(params, b), self.caption_eval,
                           int(self.config.eval.batch_size), mesh)
    metrics = {"caption_loss": out["caption_sum"] / max(out["caption_count"], 1.0),
               "caption_loss_no_image": out["no_image_sum"] / max(out["no_image_count"], 1.0)}
    metrics["caption_perplexity"] = math.exp(min(metrics["caption_loss"], 50.0))
    return metrics

  def generator(self, max_new_tokens: int):
    """The jitted decoder for answers of up to `max_new_tokens`, built once per length."""
    if max_new_tokens not in self._generators:
      self._generators[max_new_tokens] = generate_lib.make_generate(
          llm_lib.LLM(self.model_config.llm), max_new_tokens, self.tokenizer.eos_id,
          self.tokenizer.pad_id)
    return self._generators[max_new_tokens]

  def answer(self, params, images: np.ndarray, conversations: list[list[dict]], *, mesh,
             max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, prompt_len: int | None = None,
             batch_size: int | None = None) -> list[str]:
    """The assistant's next answer for each (image, conversation ending with a
    question), the rows split over the processes (mmjax.eval.sharded.run_rows)
    in global batches of `batch_size` (default: all at once). Sampling draws
    from `seed` per batch."""
    prompts = [instruct.tokenize(c, self.tokenizer, self.template)[0] for c in conversations]
    length = prompt_len or max(len(p) for p in prompts)
    if max(len(p) for p in prompts) > length:
      raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens exceeds {length}")
    ids = np.stack([instruct.pad_to(p, length, self.tokenizer.pad_id) for p in prompts])
    gen = self.generator(max_new_tokens)
    rng = jax.random.PRNGKey(seed)

    def decode(batch):
      embeds, plan = self._embed(params, batch["image"], batch["ids"])
      return {"tokens": gen(params["llm"], embeds, plan["valid"], rng, temperature, top_p)}

    tokens = sharded.run_rows(decode, {"image": np.asarray(images), "ids": ids},
                              batch_size or len(ids), mesh)["tokens"]
    return [self.tokenizer.decode(t) for t in generate_lib.trim(
        tokens, self.tokenizer.eos_id, self.tokenizer.pad_id)]

  @functools.cached_property
  def vqa_eval(self) -> tuple[list[dict], np.ndarray]:
    """(records, preprocessed images) of the held-out questions."""
    cfg = self.data_cfg
    path = llava_data.json_path(cfg, "eval_json_path", "vqa_eval.json")
    records = instruct.load_json(path)[:int(self.config.eval.get("num_questions", 100000))]
    images = np.stack([
        transforms.preprocess_image(llava_data.read_image(cfg, r["image"]), cfg.image_size,
                                    cfg.transforms.normalize,
                                    pad_square=bool(cfg.transforms.pad_to_square))
        for r in records])
    return records, images

  def vqa(self, params, mesh) -> dict[str, float]:
    """Exact-match accuracy on the held-out questions, overall and per type."""
    records, images = self.vqa_eval
    predictions = self.answer(
        params, images, [r["conversations"][:1] for r in records], mesh=mesh,
        prompt_len=self.max_len, batch_size=int(self.config.eval.batch_size),
        max_new_tokens=int(self.config.eval.get("max_new_tokens", 8)))
    return vqa.accuracy(predictions, [r["answer"] for r in records],
                        [r.get("question_type", "all") for r in records])
