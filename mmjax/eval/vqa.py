"""VQA accuracy: exact match after normalisation, overall and per question type."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from mmjax.data.instruct import answer_matches, normalize_answer

__all__ = ["accuracy", "answer_matches", "normalize_answer"]


def accuracy(predictions: Sequence[str], answers: Sequence[str],
             types: Sequence[str] | None = None) -> dict[str, float]:
  """{"vqa_accuracy": mean, "vqa_accuracy/<type>": mean per type, "vqa_count": n}."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
  types = types or ["all"] * len(answers)
  per_type: dict[str, list[bool]] = defaultdict(list)
  correct = []
  for pred, ans, kind in zip(predictions, answers, types):
    ok = answer_matches(pred, ans)
    correct.append(ok)
    per_type[kind].append(ok)
  out = {"vqa_accuracy": sum(correct) / max(len(correct), 1), "vqa_count": len(correct)}
  for kind, oks in sorted(per_type.items()):
    out[f"vqa_accuracy/{kind}"] = sum(oks) / len(oks)
  return out
