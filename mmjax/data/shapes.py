"""The embedded synthetic scenes: coloured shapes on a plain background.

Each example is deterministic from (seed, split, index): an RGB image with 1 to 4
non-overlapping objects, several paraphrased captions, the boxes as text
("red circle: [0.12, 0.30, 0.41, 0.62]", normalised x0, y0, x1, y1) and the
symbolic scene, from which later code writes questions and answers.

Some colour-shape pairs never appear in the train split (not even as a
secondary object), so zero-shot accuracy on them measures composition.
Object 0 is the largest; its pair is the example's `label`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 36, 36),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 175, 60),
    "cyan": (40, 210, 225),
    "blue": (40, 80, 235),
    "purple": (145, 55, 205),
    "pink": (250, 135, 205),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# The generator's version: bump it whenever its output changes, so that prepared
# data (the TFDS builder, the instruction data) is written again.
VERSION = "1.1.0"
# Half-extent of an object as a fraction of the image side, per size.
_RADIUS = {"small": (0.10, 0.13), "large": (0.16, 0.21)}
_SUPERSAMPLE = 4
_HELD_OUT_SEED = 20240601
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten")

PROMPT_TEMPLATES: tuple[str, ...] = (
    # No "a {}": class names start with a vowel sometimes ("orange ...").
    "a photo of one {}.",
    "an image of one {}.",
    "one {}.",
    "the {}.",
    "a picture of the {}.",
    "a drawing of the {}.",
)


def num_classes() -> int:
  return len(COLOR_NAMES) * len(SHAPES)


def class_index(color: str, shape: str) -> int:
  return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_names() -> list[str]:
  """Zero-shot class names, "red circle", indexed by `label`."""
  return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]


@functools.lru_cache(maxsize=None)
def held_out_pairs(fraction: float = 0.15) -> frozenset[tuple[str, str]]:
  """The (colour, shape) pairs kept out of train; fixed for a given fraction.

  Every colour and every shape keeps at least two partners in train.
  """
  if not 0 <= fraction < 0.5:
    raise ValueError(f"held_out_fraction must be in [0, 0.5), got {fraction}")
  pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
  k = int(round(fraction * len(pairs)))
  rng = np.random.default_rng(_HELD_OUT_SEED)
  for _ in range(1000):
    chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), size=k, replace=False))]
    colors_left = [len(SHAPES) - sum(c == col for c, _ in chosen) for col in COLOR_NAMES]
    shapes_left = [len(COLOR_NAMES) - sum(s == shp for _, s in chosen) for shp in SHAPES]
    # Spread over colours and shapes: no colour loses more than two shapes.
    if min(colors_left) >= len(SHAPES) - 2 and min(shapes_left) >= 2:
      return frozenset(chosen)
  raise ValueError(f"cannot hold out {k} pairs and keep every colour and shape in train")


def held_out_labels(fraction: float = 0.15) -> list[int]:
  return sorted(class_index(c, s) for c, s in held_out_pairs(fraction))


# ---------------------------------------------------------------------------
# Scene sampling


def split_seed(seed: int, split: str) -> list[int]:
  return [int(seed), SPLITS.index(split)]


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng(split_seed(seed, split) + [int(index)])


def sample_scene(rng: np.random.Generator, *, image_size: int, num_objects: int,
                 allowed_pairs: list[tuple[str, str]]) -> dict[str, Any]:
  """Objects with shape, colour, size, centre and radius (pixels); object 0 is the largest."""
  s = image_size
  sizes = rng.choice(SIZES, size=num_objects)
  radii = np.array([rng.uniform(*_RADIUS[z]) * s for z in sizes])
  order = np.argsort(-radii, kind="stable")
  sizes, radii = sizes[order], radii[order]
  pair_ids = rng.choice(len(allowed_pairs), size=num_objects, replace=False)
  objects, placed = [], []
  for size, r, pid in zip(sizes, radii, pair_ids):
    for attempt in (0, 1):
      if attempt == 1:  # no room: try once more as a small object
        size = "small"
        r = min(r, rng.uniform(*_RADIUS["small"]) * s)
      center = _place(rng, r, s, placed)
      if center is not None:
        break
    if center is None:
      continue
    placed.append((center[0], center[1], r))
    color, shape = allowed_pairs[pid]
    objects.append({"shape": shape, "color": color, "size": str(size),
                    "center": [round(center[0], 3), round(center[1], 3)], "radius": round(r, 3)})
  # A demoted object can now be smaller than a later one: keep object 0 the largest.
  objects.sort(key=lambda o: -o["radius"])
  level = int(rng.integers(30, 111))
  tint = rng.integers(-8, 9, size=3)
  background = [int(np.clip(level + t, 0, 255)) for t in tint]
  return {"image_size": s, "background": background, "objects": objects}


def _place(rng, r, s, placed, tries: int = 60):
  lo, hi = r + 1.0, s - r - 1.0
  if hi <= lo:
    return None
  for _ in range(tries):
    x, y = rng.uniform(lo, hi, size=2)
    # Squares around the objects must not touch (1 px gap), so boxes never overlap.
    if all(abs(x - px) > r + pr + 1.5 or abs(y - py) > r + pr + 1.5 for px, py, pr in placed):
      return float(x), float(y)
  return None


# ---------------------------------------------------------------------------
# Rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "square":
    h = 0.82 * r
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if shape == "triangle":
    return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
  if shape == "star":
    pts = []
    for k in range(10):
      a = -np.pi / 2 + k * np.pi / 5
      rr = r if k % 2 == 0 else 0.45 * r
      pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts
  if shape == "cross":
    w = 0.34 * r
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: dict[str, Any]) -> tuple[np.ndarray, list[list[float]]]:
  """Scene -> (uint8 [S, S, 3] image, tight normalised boxes per object).

  Drawn 4x larger and box-filtered down, so edges are antialiased; a box holds
  every pixel that any part of its object touches.
  """
  s, k = scene["image_size"], _SUPERSAMPLE
  img = Image.new("RGB", (s * k, s * k), tuple(scene["background"]))
  ids = Image.new("L", (s * k, s * k), 0)
  draw, draw_ids = ImageDraw.Draw(img), ImageDraw.Draw(ids)
  for i, obj in enumerate(scene["objects"]):
    cx, cy, r = obj["center"][0] * k, obj["center"][1] * k, obj["radius"] * k
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
      bbox = [cx - r, cy - r, cx + r, cy + r]
      draw.ellipse(bbox, fill=fill)
      draw_ids.ellipse(bbox, fill=i + 1)
    else:
      pts = _polygon(obj["shape"], cx, cy, r)
      draw.polygon(pts, fill=fill)
      draw_ids.polygon(pts, fill=i + 1)
  image = np.asarray(img.reduce(k))
  owner = np.asarray(ids)
  boxes = []
  for i, obj in enumerate(scene["objects"]):
    # Look only around the object (objects never come within 1 px of another).
    x0 = max(int((obj["center"][0] - obj["radius"] - 1) * k), 0)
    y0 = max(int((obj["center"][1] - obj["radius"] - 1) * k), 0)
    x1 = int((obj["center"][0] + obj["radius"] + 1) * k) + 1
    y1 = int((obj["center"][1] + obj["radius"] + 1) * k) + 1
    mask = owner[y0:y1, x0:x1] == i + 1
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    # Sub-pixel extent -> the output pixels it touches.
    px0, px1 = (x0 + xs[0]) // k, (x0 + xs[-1]) // k + 1
    py0, py1 = (y0 + ys[0]) // k, (y0 + ys[-1]) // k + 1
    boxes.append([round(px0 / s, 4), round(py0 / s, 4), round(px1 / s, 4), round(py1 / s, 4)])
  return image, boxes


# ---------------------------------------------------------------------------
# Words


def article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(shape: str) -> str:
  return PLURALS.get(shape, shape + "s")


def object_name(obj: dict[str, Any]) -> str:
  """"red circle": the class name of an object, as in the boxes text."""
  return f"{obj['color']} {obj['shape']}"


def relation(a: dict[str, Any], b: dict[str, Any]) -> str:
  """Where `a` is relative to `b`: "to the left of", "to the right of", "above" or "below"."""
  dx = a["center"][0] - b["center"][0]
  dy = a["center"][1] - b["center"][1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def location(obj: dict[str, Any], image_size: int) -> str:
  """ "in the top left", "at the bottom", "in the center", ... from the object's centre."""
  col = min(int(3 * obj["center"][0] / image_size), 2)
  row = min(int(3 * obj["center"][1] / image_size), 2)
  v = ("top", "", "bottom")[row]
  h = ("left", "", "right")[col]
  if v and h:
    return f"in the {v} {h}"
  if v:
    return f"at the {v}"
  if h:
    return f"on the {h}"
  return "in the center"


def boxes_text(scene: dict[str, Any]) -> str:
  """One line per object: "red circle: [0.12, 0.30, 0.41, 0.62]"."""
  return "\n".join(f"{object_name(o)}: [{', '.join(f'{v:.2f}' for v in o['box'])}]"
                   for o in scene["objects"])


def _phrase(obj, rng, size_p=0.5) -> str:
  name = object_name(obj)
  if rng.random() < size_p:
    name = f"{obj['size']} {name}"
  return article(name)


def _listing(phrases: list[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _background_word(scene) -> str:
  return "dark gray" if np.mean(scene["background"]) < 70 else "gray"


def captions(scene: dict[str, Any], rng: np.random.Generator, count: int = 5) -> list[str]:
  """`count` different paraphrases describing the scene."""
  objs = scene["objects"]
  s = scene["image_size"]
  n = len(objs)
  main = objs[0]
  bg = _background_word(scene)
  if n == 1:
    name = object_name(main)
    loc = location(main, s)
    options = [
        article(name),
        article(f"{main['size']} {name}"),
        f"{article(name)} {loc}",
        f"a photo of one {name}",
        f"one {name} on a {bg} background",
        f"a single {main['shape']} colored {main['color']}",
        f"there is {article(main['size'] + ' ' + name)} {loc}",
        f"an image showing one {main['color']} {main['shape']} {loc}",
        f"the {name} is {main['size']}",
        f"a {main['color']} shape: {article(main['shape'])}",
    ]
  else:
    other = objs[1]
    phrases = [_phrase(o, rng) for o in objs]
    listing = _listing(phrases)
    count_word = NUMBER_WORDS[n]
    rest = n - 1
    options = [
        f"{phrases[0]} {relation(main, other)} {phrases[1]}",
        f"{phrases[1]} {relation(other, main)} {phrases[0]}",
        f"{count_word} objects: {listing}",
        listing,
        f"{count_word} shapes on a {bg} background: {listing}",
        f"{_phrase(main, rng, 1.0)} {location(main, s)} and {NUMBER_WORDS[rest]} other "
        f"shape{'s' if rest > 1 else ''}",
        f"{count_word} shapes, the largest one is {article(object_name(main))}",
        f"there are {count_word} shapes: {listing}",
        f"an image with {listing}",
    ]
  picked = rng.permutation(len(options))[:count]
  return [options[i] for i in picked]


# ---------------------------------------------------------------------------
# Examples


def num_objects_for(index: int, rng: np.random.Generator, single_fraction: float) -> int:
  # Exactly `single_fraction` of every run of indices is single-object.
  if int((index + 1) * single_fraction) > int(index * single_fraction):
    return 1
  return int(rng.integers(2, 5))


def make_example(seed: int, split: str, index: int, *, image_size: int = 64,
                 single_fraction: float = 0.5, held_out_fraction: float = 0.15,
                 num_captions: int = 5) -> dict[str, Any]:
  """One example: image, captions, boxes text, scene JSON, label, num_objects."""
  if split not in SPLITS:
    raise ValueError(f"unknown shapes split {split!r}; known: {SPLITS}")
  rng = example_rng(seed, split, index)
  all_pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
  if split == "train":
    held = held_out_pairs(held_out_fraction)
    allowed = [p for p in all_pairs if p not in held]
  else:
    allowed = all_pairs
  n = num_objects_for(index, rng, single_fraction)
  scene = sample_scene(rng, image_size=image_size, num_objects=n, allowed_pairs=allowed)
  texts = captions(scene, rng, num_captions)
  image, boxes = render(scene)
  for obj, box in zip(scene["objects"], boxes):
    obj["box"] = box
  main = scene["objects"][0]
  return {
      "image": image,
      "captions": texts,
      "boxes": boxes_text(scene),
      "scene": json.dumps(scene, separators=(",", ":")),
      "label": class_index(main["color"], main["shape"]),
      "num_objects": len(scene["objects"]),
  }


# Words and sentences that later question/answer text needs; they go into the
# default tokenizer's corpus, so those texts tokenise into whole words.
QA_SENTENCES: tuple[str, ...] = (
    "how many objects are there in the image?",
    "how many shapes are in the picture? there are two shapes.",
    "what color is the circle? the circle is red.",
    "what colour is the square? what shape is the largest object?",
    "is there a blue star in the image? yes, there is. no, there is not.",
    "are there any triangles? yes. no.",
    "is the red circle to the left of the blue square? yes, it is to the left.",
    "is the green star above or below the yellow diamond? it is above. it is below.",
    "which object is on the right? which shape is bigger? which one is smaller?",
    "where is the pink cross? it is in the top left corner of the image.",
    "the bottom right corner, the top right corner, the bottom left corner, the middle.",
    "describe the image in detail. the image shows a large red circle near the center.",
    "give the bounding box of the purple triangle: [0.12, 0.30, 0.41, 0.62]",
    "what are the coordinates of the cyan diamond? [0.05, 0.55, 0.38, 0.97]",
    "the largest shape is the orange square. the smallest shape is the green cross.",
    "count the objects. there is one object. there are three objects. four objects.",
    "what is the relation between the two shapes? the first is next to the second.",
    "reason step by step. first, second, third, then, so, because, answer:",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: <image>\nWhat is in the image? ASSISTANT: a small yellow triangle.",
    "Human: Assistant: please look at the picture and answer with a single word.",
    "Answer the question using a single word or phrase. true false correct wrong",
    "0 1 2 3 4 5 6 7 8 9 10 0.0 0.25 0.5 0.75 1.0 zero one two three four five six seven"
    " eight nine ten first second third fourth none both all each any some most",
    "left right above below top bottom center centre middle near far next to between",
    "small large big bigger smaller largest smallest biggest size sizes same different",
    "color colour colors colours shape shapes object objects image picture photo scene",
    "red orange yellow green cyan blue purple pink white black gray grey brown background",
    "circle square triangle star diamond cross circles squares triangles stars diamonds"
    " crosses hexagon rectangle shape",
)


def tokenizer_corpus(seed: int, num_train: int, *, image_size: int = 64,
                     single_fraction: float = 0.5, held_out_fraction: float = 0.15,
                     num_captions: int = 5, limit: int = 4000) -> list[str]:
  """Sentences for the default tokenizer: train captions, boxes, QA words, all class names.

  Replays the train split's sampling without rendering, so it is cheap and
  matches the stored captions exactly.
  """
  held = held_out_pairs(held_out_fraction)
  allowed = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in held]
  # Repeated so that their words become whole pieces even beside many captions.
  out = list(QA_SENTENCES) * 20
  for i in range(min(num_train, limit)):
    rng = example_rng(seed, "train", i)
    n = num_objects_for(i, rng, single_fraction)
    scene = sample_scene(rng, image_size=image_size, num_objects=n, allowed_pairs=allowed)
    out.extend(captions(scene, rng, num_captions))
  # Held-out names never occur in train captions; the text tower still needs
  # their words, which it has, and their class prompts should tokenise alike.
  for name in class_names():
    out.extend(t.format(name) for t in PROMPT_TEMPLATES)
  for k in range(0, 101, 1):
    out.append(f"[{k / 100:.2f}, {(100 - k) / 100:.2f}]")
  return out
