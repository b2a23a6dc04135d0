"""Image transforms: pure numpy/PIL, shared by the pipelines, eval and embedding code.

Eval preprocessing follows OpenAI CLIP: bicubic resize of the shorter side, centre
crop, normalise with CLIP's mean and std; LLaVA 1.5 first pads to a square with
its mean colour.
"""

from __future__ import annotations

import functools
import io
import os
import re
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_PAD_COLOR = (122, 116, 104)
NORMALIZE_MODES = ("clip", "minus_one_one", "zero_one")


def to_pil(image: Any) -> Image.Image:
  """PIL image, uint8 array ([H, W], [H, W, 1|3|4]), encoded bytes or a path -> RGB PIL image."""
  if isinstance(image, Image.Image):
    pil = image
  elif isinstance(image, (bytes, bytearray)):
    pil = Image.open(io.BytesIO(image))
  elif isinstance(image, (str, os.PathLike)):
    pil = Image.open(image)
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    pil = Image.fromarray(array)
  return pil if pil.mode == "RGB" else pil.convert("RGB")


def decode(data: bytes) -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3]; raises on corrupt data."""
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    return np.asarray(img.convert("RGB"))


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize of the shorter side to `size`; the longer side is
  int(size * long / short), truncated as in torchvision and transformers'
  CLIPImageProcessor (rounding would give a different crop for some shapes)."""
  w, h = image.size
  if min(w, h) == size:
    return image
  short, long = min(w, h), max(w, h)
  new_long = int(size * long / short)
  new = (size, new_long) if w <= h else (new_long, size)
  return image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  w, h = image.size
  if (w, h) == (size, size):
    return image
  left, top = (w - size) // 2, (h - size) // 2
  return image.crop((left, top, left + size, top + size))


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
  """Inception-style crop: random area fraction and aspect ratio, resized to `size`."""
  w, h = image.size
  area = w * h
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x = int(rng.integers(0, w - cw + 1))
      y = int(rng.integers(0, h - ch + 1))
      return image.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
  # No valid crop in 10 tries (extreme aspect): fall back to the centre.
  return center_crop(resize_shorter(image, size), size)


def hflip(image: Image.Image) -> Image.Image:
  return image.transpose(Image.FLIP_LEFT_RIGHT)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = LLAVA_PAD_COLOR) -> Image.Image:
  """LLaVA 1.5: centre the image on a square of the mean colour."""
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  out = Image.new("RGB", (side, side), fill)
  out.paste(image, ((side - w) // 2, (side - h) // 2))
  return out


def _affine(mode: str) -> tuple[np.ndarray, np.ndarray]:
  if mode == "clip":
    std = np.asarray(CLIP_STD, np.float32)
    mean = np.asarray(CLIP_MEAN, np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)
  if mode == "minus_one_one":
    return np.full(3, 2 / 255, np.float32), np.full(3, -1, np.float32)
  if mode == "zero_one":
    return np.full(3, 1 / 255, np.float32), np.zeros(3, np.float32)
  raise ValueError(f"unknown normalisation {mode!r}; choose one of {NORMALIZE_MODES}")


_AFFINE = {m: _affine(m) for m in NORMALIZE_MODES}


def normalize(image: np.ndarray, mode: str = "clip") -> np.ndarray:
  """uint8 [..., 3] -> float32: CLIP mean/std, [-1, 1] or [0, 1]."""
  if mode not in _AFFINE:
    _affine(mode)  # raises with the known modes
  out = np.array(image, dtype=np.float32)
  scale, offset = _tiled(mode, out.shape)
  out *= scale
  out += offset
  return out


@functools.lru_cache(maxsize=32)
def _tiled(mode: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  # Full-size operands: numpy broadcasting over a last axis of 3 is ~6x slower.
  scale, offset = _AFFINE[mode]
  return np.broadcast_to(scale, shape).copy(), np.broadcast_to(offset, shape).copy()


def denormalize(image: np.ndarray, mode: str = "clip") -> np.ndarray:
  """The inverse of `normalize`, back to uint8 (for figures)."""
  scale, offset = _AFFINE[mode]
  return np.clip(np.round((np.asarray(image) - offset) / scale), 0, 255).astype(np.uint8)


def preprocess_image(image: Any, size: int, mode: str = "clip", *,
                     pad_square: bool = False) -> np.ndarray:
  """Eval preprocessing: [pad to square,] resize shorter side (bicubic), centre crop, normalise.

  Returns float32 [size, size, 3].
  """
  array = _already_sized(image, size)
  if array is None or pad_square:
    pil = to_pil(image)
    if pad_square:
      pil = pad_to_square(pil)
    array = np.asarray(center_crop(resize_shorter(pil, size), size))
  return normalize(array, mode)


def train_image(image: Any, size: int, rng: np.random.Generator, *, mode: str = "clip",
                random_crop: bool = False, crop_scale: tuple[float, float] = (0.08, 1.0),
                flip: bool = False, pad_square: bool = False,
                transpose: bool = False) -> np.ndarray:
  """Train preprocessing: optional random resized crop, mirror when `flip`, then normalise;
  rows and columns swapped when `transpose`.

  The caller decides `flip`, so that it can mirror the caption too (`mirror_text`).
  """
  if not random_crop and not flip:
    out = preprocess_image(image, size, mode, pad_square=pad_square)
  else:
    pil = to_pil(image)
    if pad_square:
      pil = pad_to_square(pil)
    if random_crop:
      pil = random_resized_crop(pil, size, rng, scale=tuple(crop_scale))
    else:
      pil = center_crop(resize_shorter(pil, size), size)
    if flip:
      pil = hflip(pil)
    out = normalize(np.asarray(pil), mode)
  return out.swapaxes(0, 1) if transpose else out


_MIRROR = re.compile(r"\b(left|right)\b")


def mirror_text(text: str) -> str:
  """Swaps "left" and "right", for a caption of a mirrored image."""
  return _MIRROR.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


def _already_sized(image: Any, size: int) -> np.ndarray | None:
  # Fast path: the embedded datasets are stored at the training size.
  if isinstance(image, np.ndarray) and image.shape == (size, size, 3) and image.dtype == np.uint8:
    return image
  return None
