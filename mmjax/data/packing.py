"""Documents packed into rows of a fixed length: each row holds whole documents
back to back, with segment ids (1, 2, ... per document, 0 = padding) and
positions that restart at 0 per document, and labels that never cross from one
document into the next.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmjax.data.instruct import IGNORE_INDEX


class PackedText:
  """Documents (token arrays starting with BOS) packed greedily into rows of
  `seq_len`, reshuffled every epoch. Batches: tokens, labels (-100 at each
  document's first token and at padding), segments (1, 2, ... per document in
  a row, 0 = padding) and positions (restarting at 0 per document).
  Checkpointable: the state is (epoch, next document)."""

  def __init__(self, docs: list[np.ndarray], batch_size: int, seq_len: int, *, seed: int,
               pad_id: int = 0):
    if not docs:
      raise ValueError("no documents to pack")
    self.docs = [d[:seq_len] for d in docs]
    self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
    self.epoch, self.cursor = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))

  def __iter__(self):
    return self

  def _peek(self) -> np.ndarray:
    if self.cursor >= len(self._order):
      self.epoch, self.cursor = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    return self.docs[int(self._order[self.cursor])]

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for _ in range(self.batch_size):
      row = []
      while sum(map(len, row)) + len(self._peek()) <= self.seq_len or not row:
        row.append(self._peek())
        self.cursor += 1
      rows.append(row)
    return pack_rows(rows, self.seq_len, self.pad_id)

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
            "batch_size": self.batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("seed", "batch_size"):
      if state[key] != getattr(self, key):
        raise ValueError(f"data state saved with {key}={state[key]}, this run has "
                         f"{getattr(self, key)}: it would not resume to the same batches")
    self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
    self._order = self._permutation(self.epoch)


def pack_rows(rows: list[list[np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows of documents -> {tokens, labels, segments, positions} [len(rows), seq_len]."""
  n = len(rows)
  out = {"tokens": np.full((n, seq_len), pad_id, np.int32),
         "labels": np.full((n, seq_len), IGNORE_INDEX, np.int32),
         "segments": np.zeros((n, seq_len), np.int32),
         "positions": np.zeros((n, seq_len), np.int32)}
  for i, row in enumerate(rows):
    used = 0
    for seg, doc in enumerate(row, start=1):
      doc = doc[:seq_len - used]
      k = len(doc)
      out["tokens"][i, used:used + k] = doc
      out["labels"][i, used + 1:used + k] = doc[1:]  # never predict across documents
      out["segments"][i, used:used + k] = seg
      out["positions"][i, used:used + k] = np.arange(k)
      used += k
  return out


def pack_all(docs: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Every document once, in order, packed greedily into rows (see pack_rows)."""
  rows, row = [], []
  for doc in docs:
    doc = doc[:seq_len]
    if row and sum(map(len, row)) + len(doc) > seq_len:
      rows.append(row)
      row = []
    row.append(doc)
  rows.append(row)
  return pack_rows(rows, seq_len, pad_id)
