"""CLIP evaluation: zero-shot classification with a template ensemble, and retrieval.

Both are exact over the whole split: every process embeds its own shard, the
embeddings are gathered, and padding rows (mask False) are dropped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import parallel


def gather(x) -> np.ndarray:
  """A global array (sharded over processes) -> the full numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def class_embeddings(encode_text: Callable, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str], context_length: int) -> np.ndarray:
  """[C, E]: per class, the normalised mean of its normalised template embeddings."""
  prompts = [t.format(c) for c in class_names for t in templates]
  ids = tokenizer.encode_batch(prompts, context_length)
  emb = np.asarray(encode_text(ids), np.float32).reshape(len(class_names), len(templates), -1)
  emb = emb.mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def recall_at_k(sim: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """sim[i, j]: query i against candidate j, the true candidate of query i is j = i.

  R@k = mean(rank of the true candidate < k); ties count against the query.
  """
  true = np.diag(sim)[:, None]
  rank = np.sum(sim > true, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}


def embed_split(encode_image: Callable, encode_text: Callable, batches, mesh) -> dict:
  """Embeds every batch; returns host arrays of the valid rows only."""
  images, texts, labels, objects = [], [], [], []
  for batch in batches:
    glob = parallel.host_to_global({"image": batch["image"], "text": batch["text"]}, mesh)
    img, txt = encode_image(glob["image"]), encode_text(glob["text"])
    mask = gather(parallel.host_to_global(batch["mask"], mesh)).astype(bool)
    images.append(gather(img)[mask])
    texts.append(gather(txt)[mask])
    labels.append(gather(parallel.host_to_global(batch["label"], mesh))[mask])
    n = batch.get("num_objects", np.ones_like(batch["label"]))
    objects.append(gather(parallel.host_to_global(n, mesh))[mask])
  return {"image": np.concatenate(images), "text": np.concatenate(texts),
          "label": np.concatenate(labels), "num_objects": np.concatenate(objects)}


def evaluate(emb: dict, class_emb: np.ndarray | None, held_out: Sequence[int] = ()) -> dict:
  """Zero-shot top-1 (on single-object images) and retrieval R@1/5/10 both ways."""
  metrics = {}
  if class_emb is not None:
    single = emb["num_objects"] == 1
    pred = np.argmax(emb["image"][single] @ class_emb.T, axis=-1)
    labels = emb["label"][single]
    correct = pred == labels
    metrics["zeroshot_top1"] = float(np.mean(correct))
    metrics["zeroshot_count"] = int(correct.size)
    if len(held_out):
      unseen = np.isin(labels, np.asarray(held_out))
      if unseen.any():
        metrics["zeroshot_top1_heldout"] = float(np.mean(correct[unseen]))
        metrics["zeroshot_top1_seen"] = float(np.mean(correct[~unseen]))
  sim = emb["image"] @ emb["text"].T
  for k, v in recall_at_k(sim).items():
    metrics[f"i2t_r{k}"] = v
  for k, v in recall_at_k(sim.T).items():
    metrics[f"t2i_r{k}"] = v
  return metrics
