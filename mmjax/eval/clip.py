"""CLIP evaluation: zero-shot classification with a template ensemble, and retrieval.

Both are exact over the whole split: every process embeds its own shard, the
embeddings are gathered once (mmjax.eval.sharded), and padding rows (mask
False) are dropped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mmjax.eval import sharded


def class_embeddings(embed_texts: Callable[[np.ndarray], np.ndarray], tokenizer,
                     class_names: Sequence[str], templates: Sequence[str],
                     context_length: int) -> np.ndarray:
  """[C, E]: per class, the normalised mean of its normalised template embeddings.

  embed_texts: token ids [N, context_length] -> host embeddings [N, E].
  """
  prompts = [t.format(c) for c in class_names for t in templates]
  ids = tokenizer.encode_batch(prompts, context_length)
  emb = np.asarray(embed_texts(ids), np.float32).reshape(len(class_names), len(templates), -1)
  emb = emb.mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def recall_at_k(sim: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """sim[i, j]: query i against candidate j, the true candidate of query i is j = i.

  R@k = mean(rank of the true candidate < k); ties count against the query.
  """
  true = np.diag(sim)[:, None]
  rank = np.sum(sim > true, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}


EMBED_KEYS = ("image", "text", "label", "num_objects")


def embed_split(embed_batch: Callable, batches, mesh) -> dict:
  """Host arrays (EMBED_KEYS) of the valid rows of every process's batches.

  embed_batch: a global batch -> {image, text} embeddings and its label and
  num_objects, per row (see mmjax.eval.sharded.run_batches).
  """
  out = sharded.run_batches(embed_batch, batches, mesh)
  return {k: out[k][out["mask"]] for k in EMBED_KEYS}


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
