"""python -m mmjax.embed --workdir=DIR --images=PATH[,PATH...] --texts="a|b|c" --out=FILE.npz

Image and text embeddings of a CLIP workdir (written by `mmjax.train` or
`mmjax.convert`), with the checkpoint's own preprocessing and tokenizer. The npz
holds `image_embeds` [N, D] and `text_embeds` [M, D], projected and
L2-normalised, in input order (plus `images` and `texts`). With
`--zeroshot_labels=cat,dog` it prints each image's class probabilities
(prompt templates of the workdir's dataset, averaged per class) and stores them
as `zeroshot_probs` [N, C].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mmjax.convert import workdir as workdir_lib
from mmjax.data import pipeline, transforms
from mmjax.eval import clip as clip_eval
from mmjax.models import clip as clip_lib


def _define_flags() -> None:
  # Defined only when run as a program, so that importing this module next to
  # another entry point (mmjax.chat also has --workdir) defines no flag twice.
  flags.DEFINE_string("workdir", None, "a CLIP workdir (mmjax.train or mmjax.convert)")
  flags.DEFINE_list("images", [], "image files, comma-separated")
  flags.DEFINE_string("texts", "", "texts separated by '|'")
  flags.DEFINE_string("out", None, "the .npz to write")
  flags.DEFINE_list("zeroshot_labels", [], "class names: print per-image probabilities")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.DEFINE_integer("batch_size", 64, "examples per forward pass")
  flags.mark_flags_as_required(["workdir"])


class Embedder:
  """A CLIP workdir's model, params, tokenizer and preprocessing."""

  def __init__(self, workdir: str, step: int | None = None):
    from mmjax.train import tasks
    config = workdir_lib.load_config(workdir)
    if config.task != "clip":
      raise ValueError(f"{workdir} holds a {config.task!r} model; mmjax.embed needs a CLIP one")
    workdir_lib.use_local_tokenizer(config, workdir)
    self.config = config
    self.task = tasks.build_task(config)
    self.tokenizer = self.task.tokenizer
    model = self.task.model
    abstract = jax.eval_shape(lambda: _unbox(self.task.init(jax.random.PRNGKey(0))))
    self.params = workdir_lib.restore_params(workdir, abstract, step)
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                   method=clip_lib.CLIP.encode_image))
    self._text = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                                  method=clip_lib.CLIP.encode_text))
    data = config.data
    self.image_size = int(data.image_size)
    self.context_length = int(data.context_length)
    self.normalize = data.transforms.normalize
    self.pad_square = bool(data.transforms.get("pad_to_square", False))

  @property
  def logit_scale(self) -> float:
    return float(math.exp(min(float(self.params["log_scale"]), clip_lib.MAX_LOG_SCALE)))

  def preprocess(self, image) -> np.ndarray:
    """An image file, PIL image or uint8 array, prepared as the evaluation does."""
    return transforms.preprocess_image(image, self.image_size, self.normalize,
                                       pad_square=self.pad_square)

  def images(self, paths: Sequence, batch_size: int = 64) -> np.ndarray:
    """[N, D] normalised image embeddings of image files (or PIL images, uint8 arrays)."""
    pixels = [self.preprocess(p) for p in paths]
    return self._batched(self._image, np.stack(pixels) if pixels else None, batch_size)

  def texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """[M, D] normalised text embeddings."""
    ids = self.tokenizer.encode_batch(list(texts), self.context_length) if texts else None
    return self._batched(self._text, ids, batch_size)

  def _batched(self, fn, inputs, batch_size: int) -> np.ndarray:
    if inputs is None:
      dim = self.task.model_config.embed_dim
      return np.zeros((0, dim), np.float32)
    out = []
    for i in range(0, len(inputs), batch_size):
      chunk = inputs[i:i + batch_size]
      n = len(chunk)
      if n < batch_size and len(inputs) > batch_size:  # one compiled shape for all batches
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
      out.append(np.asarray(fn(self.params, jnp.asarray(chunk)), np.float32)[:n])
    return np.concatenate(out)

  def zeroshot(self, image_embeds: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """[N, C] class probabilities (softmax of the scaled cosine similarities)."""
    classes = clip_eval.class_embeddings(
        lambda ids: self._text(self.params, jnp.asarray(ids)), self.tokenizer, list(labels),
        pipeline.prompt_templates(self.config.data), self.context_length)
    logits = self.logit_scale * image_embeds @ classes.T
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=-1, keepdims=True)


def embed(workdir: str, images: Sequence[str] = (), texts: Sequence[str] = (),
          zeroshot_labels: Sequence[str] = (), step: int | None = None,
          batch_size: int = 64) -> dict[str, np.ndarray]:
  """What `main` writes to the npz."""
  missing = [p for p in images if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"image files not found: {missing}")
  e = Embedder(workdir, step)
  out = {"image_embeds": e.images(images, batch_size), "text_embeds": e.texts(texts, batch_size),
         "images": np.asarray(list(images), dtype=str), "texts": np.asarray(list(texts), dtype=str)}
  if zeroshot_labels:
    out["zeroshot_probs"] = e.zeroshot(out["image_embeds"], zeroshot_labels)
    out["zeroshot_labels"] = np.asarray(list(zeroshot_labels), dtype=str)
  return out


def _unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmjax import cli
  cli.init_process()
  f = flags.FLAGS
  texts = f.texts.split("|") if f.texts else []
  if not f.images and not texts:
    raise app.UsageError("give --images and/or --texts")
  if f.zeroshot_labels and not f.images:
    raise app.UsageError("--zeroshot_labels needs --images")
  out = embed(f.workdir, f.images, texts, f.zeroshot_labels, f.step, f.batch_size)
  if f.out:
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    np.savez(f.out, **out)
    print(f"wrote {f.out}: image_embeds {out['image_embeds'].shape}, "
          f"text_embeds {out['text_embeds'].shape}")
  for path, probs in zip(f.images, out.get("zeroshot_probs", [])):
    order = np.argsort(-probs)
    print(f"{path}: " + ", ".join(f"{f.zeroshot_labels[i]} {probs[i]:.4f}" for i in order))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
