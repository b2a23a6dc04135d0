"""Image classification examples from the shared pipeline's records: train
examples with the config's crops, flips and transposes, partly labelled ones
(for distillation on unlabelled images), and padded eval examples that carry
their record's index.
"""

from __future__ import annotations

import grain
import numpy as np

from mmjax.data import transforms


class ImageLabelExample(grain.transforms.RandomMap):
  """Train example -> {image, label} (with the config's random crop, flip and
  transpose); None (skipped) for an unreadable image."""

  def __init__(self, data_cfg):
    t = data_cfg.transforms
    self.size, self.mode = int(data_cfg.image_size), t.normalize
    self.crop, self.crop_scale = bool(t.random_resized_crop), tuple(t.crop_scale)
    self.flip, self.pad_square = bool(t.hflip), bool(t.pad_to_square)
    self.transpose = bool(t.get("transpose", False))

  def random_map(self, item, rng: np.random.Generator):
    _, example = item
    if example["bad"] or example["image"] is None:
      return None
    image = transforms.train_image(example["image"], self.size, rng, mode=self.mode,
                                   random_crop=self.crop, crop_scale=self.crop_scale,
                                   flip=self.flip and rng.random() < 0.5,
                                   pad_square=self.pad_square,
                                   transpose=self.transpose and rng.random() < 0.5)
    return {"image": image, "label": np.int32(example["label"])}


class PartlyLabelledExample(ImageLabelExample):
  """Every train image, its label only where the record is in `labelled_ids`:
  {image, label (-1 where unlabelled), labelled (1.0 / 0.0)}."""

  def __init__(self, data_cfg, labelled_ids: np.ndarray):
    super().__init__(data_cfg)
    self.labelled_ids = frozenset(int(i) for i in labelled_ids)

  def random_map(self, item, rng: np.random.Generator):
    out = super().random_map(item, rng)
    if out is None:
      return None
    labelled = item[0] in self.labelled_ids
    out["label"] = out["label"] if labelled else np.int32(-1)
    out["labelled"] = np.float32(labelled)
    return out


class ImageLabelEvalExample(grain.transforms.Map):
  """Eval example -> {image, label, mask, index (the record's)}; `blank()` pads
  (mask False, index -1)."""

  def __init__(self, data_cfg):
    self.size, self.mode = int(data_cfg.image_size), data_cfg.transforms.normalize
    self.pad_square = bool(data_cfg.transforms.pad_to_square)

  def map(self, item):
    index, example = item
    if example["bad"] or example["image"] is None:
      return self.blank()
    return {"image": transforms.preprocess_image(example["image"], self.size, self.mode,
                                                 pad_square=self.pad_square),
            "label": np.int32(example["label"]), "mask": np.bool_(True),
            "index": np.int32(index)}

  def blank(self) -> dict[str, np.ndarray]:
    return {"image": np.zeros((self.size, self.size, 3), np.float32), "label": np.int32(-1),
            "mask": np.bool_(False), "index": np.int32(-1)}
