"""An exported CLIP checked in transformers against the workdir it came from.

  python -m mmjax.convert --to=hf --src=runs/clip_digits --out=hf_digits --verify

loads the export folder alone with `CLIPModel`, `AutoProcessor` and
`AutoTokenizer`, embeds the images of the workdir's evaluation split and its
zero-shot prompts there and with `mmjax.embed`, and reports the largest
embedding difference and both zero-shot top-1 accuracies.
"""

from __future__ import annotations

from typing import Any

import numpy as np


NEAR_TIE = 1e-5  # a top-2 score gap this small may flip between two float32 programs


def _class_matrix(text_embeds: np.ndarray, num_classes: int) -> np.ndarray:
  """[C, E]: per class, the normalised mean of its (normalised) template embeddings."""
  emb = text_embeds.reshape(num_classes, -1, text_embeds.shape[-1]).mean(axis=1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def _normalised(x) -> np.ndarray:
  x = getattr(x, "pooler_output", x)  # transformers 5 may return a model output
  x = x.detach().float().numpy()
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def verify_clip(workdir: str, out: str, split: str | None = None, limit: int | None = None,
                batch_size: int = 256, step: int | None = None) -> dict[str, Any]:
  """Returns image_max_diff, text_max_diff, top1 {"mmjax", "transformers"},
  images (how many were compared), near_ties (images whose top-2 classes are
  within NEAR_TIE for mmjax) and tokens_equal (AutoTokenizer's ids are the
  processor's)."""
  import torch
  import transformers
  from tqdm import tqdm

  from mmjax import embed
  from mmjax.data import pipeline
  e = embed.Embedder(workdir, step)
  data = e.config.data
  model = transformers.CLIPModel.from_pretrained(out).eval()
  processor = transformers.AutoProcessor.from_pretrained(out)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)

  source = pipeline.make_source(data, split or data.eval_split)
  n = len(source) if limit is None else min(limit, len(source))
  examples = [source[i] for i in range(n)]
  images = [ex["image"] for ex in examples]
  labels = np.array([ex["label"] for ex in examples])
  names = pipeline.class_names(data)
  prompts = [t.format(c) for c in names for t in pipeline.prompt_templates(data)]

  ours_images = e.images(images, batch_size)
  ours_text = e.texts(prompts, batch_size)
  text_inputs = processor(text=prompts, return_tensors="pt", padding="max_length",
                          truncation=True)
  tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
  theirs_images = []
  from PIL import Image
  with torch.no_grad():
    theirs_text = _normalised(model.get_text_features(**text_inputs))
    for i in tqdm(range(0, n, batch_size), desc="transformers", unit="batch", leave=False):
      pixels = processor(images=[Image.fromarray(x) for x in images[i:i + batch_size]],
                         return_tensors="pt")["pixel_values"]
      theirs_images.append(_normalised(model.get_image_features(pixel_values=pixels)))
  theirs_images = np.concatenate(theirs_images)

  top1 = {}
  for name, img, txt in (("mmjax", ours_images, ours_text),
                         ("transformers", theirs_images, theirs_text)):
    scores = img @ _class_matrix(txt, len(names)).T
    top1[name] = float(np.mean(np.argmax(scores, axis=-1) == labels))
    if name == "mmjax":  # images whose two best classes float32 rounding may swap
      best = np.sort(scores, axis=-1)[:, -2:]
      near_ties = int(np.sum(best[:, 1] - best[:, 0] < NEAR_TIE))
  return {"images": n, "prompts": len(prompts), "near_ties": near_ties,
          "image_max_diff": float(np.abs(ours_images - theirs_images).max()),
          "text_max_diff": float(np.abs(ours_text - theirs_text).max()),
          "tokens_equal": bool(torch.equal(tokens["input_ids"], text_inputs["input_ids"])),
          "top1": top1}


def report(result: dict[str, Any]) -> str:
  return (f"transformers vs mmjax on {result['images']} images and {result['prompts']} "
          f"prompts: image embeddings max |diff| {result['image_max_diff']:.2e}, text "
          f"{result['text_max_diff']:.2e}; zero-shot top-1 {result['top1']['transformers']:.4f} "
          f"(mmjax {result['top1']['mmjax']:.4f})"
          + (f"; {result['near_ties']} images with their two best classes within {NEAR_TIE}"
             if result["near_ties"] else ""))
