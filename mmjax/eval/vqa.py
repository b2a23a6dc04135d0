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
  correct = [answer_matches(p, a) for p, a in zip(predictions, answers)]
  return {**by_type(correct, types or ["all"] * len(answers), "vqa_accuracy"),
          "vqa_count": len(correct)}


def by_type(correct: Sequence[bool], types: Sequence[str], name: str) -> dict[str, float]:
  """{name: mean, f"{name}/<type>": mean per type}."""
  per_type: dict[str, list[bool]] = defaultdict(list)
  for ok, kind in zip(correct, types):
    per_type[kind].append(bool(ok))
  out = {name: sum(map(bool, correct)) / max(len(correct), 1)}
  for kind, oks in sorted(per_type.items()):
    out[f"{name}/{kind}"] = sum(oks) / len(oks)
  return out
