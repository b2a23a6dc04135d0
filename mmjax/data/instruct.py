"""Visual instruction data: conversation templates, label masks, and LLaVA-style
instruction data generated from the shapes scenes' captions and boxes.

Templates. `vicuna_v1` (the default, LLaVA v1.5's):
  "<system> USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
and `plain` (stage-1 alignment): "<image>" + caption + "\\n". `tokenize` gives
(tokens, labels) with labels = -100 everywhere except the assistant's tokens
(and its EOS). Each round is tokenised whole and its instruction part on its
own; if the instruction's tokens are not a prefix of the round's, the sample
raises `TokenizationMismatchError` instead of being masked silently (LLaVA's
most reported bug).

Data (as in the LLaVA paper, from captions = context type 1 and boxes =
context type 2): multi-turn conversations about colours, shapes, counts,
positions, sizes and relations with short answers (two of every four ask
whether a colour is present: `--existence_turns`); detailed descriptions that
place every object from its box; complex-reasoning questions with explained
answers. The generator here is deterministic and rule based over the symbolic
scene; `--emit_prompts` also writes the text-only prompts (captions + boxes +
instructions + a few-shot example) to send to a text LLM instead.

  python -m mmjax.data.instruct --out=DIR [--num_train=6000 --num_eval=100
      --image_size=64 --emit_prompts]

writes DIR/images/{train,eval}/NNNNNN.png, DIR/captions.json (stage 1),
DIR/instruct.json (stage 2), DIR/captions_eval.json and DIR/vqa_eval.json
(held-out scenes, single-turn questions with "answer" and "question_type"),
DIR/grounded.json and DIR/grounded_eval.json (the LM's text-only
conversations: each scene's description in place of its image; the eval file
asks the held-out questions), DIR/tokenizer.model, all in the public LLaVA
JSON format.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import re
import string
from typing import Any, Iterable, Sequence

import numpy as np

from mmjax.data import shapes
from mmjax.data import tokenizer as tokenizer_lib

IGNORE_INDEX = -100
IMAGE_TOKEN = tokenizer_lib.IMAGE_TOKEN


class TokenizationMismatchError(ValueError):
  """A template's separators tokenise differently in context than alone."""


# ---------------------------------------------------------------------------
# Templates


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")


@dataclasses.dataclass(frozen=True)
class Template:
  """A conversation format. style "two": system, roles and two separators (Vicuna
  v1: `sep` after the system prompt and user turns, `sep2` = EOS after assistant
  turns); style "plain": image + answer + `sep`, nothing else."""

  name: str
  system: str = VICUNA_SYSTEM
  roles: tuple[str, str] = ("USER", "ASSISTANT")
  sep: str = " "
  sep2: str = "</s>"  # rendered text only; tokenised as the tokenizer's EOS id
  style: str = "two"


TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1"),
    "plain": Template("plain", system="", roles=("", ""), sep="\n", sep2="", style="plain"),
}


def get_template(name: str, system: str | None = None) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; choose one of {list(TEMPLATES)}")
  template = TEMPLATES[name]
  return template if system is None else dataclasses.replace(template, system=system)


def _pairs(messages: Sequence[dict]) -> list[tuple[str, str | None]]:
  """[(human, gpt or None)]: alternating turns, starting with the human."""
  roles = [m["from"] for m in messages]
  want = ["human", "gpt"] * ((len(messages) + 1) // 2)
  if roles != want[:len(roles)] or not roles:
    raise ValueError(f"conversation turns must alternate human, gpt, ... starting with human; "
                     f"got {roles}")
  return [(messages[i]["value"], messages[i + 1]["value"] if i + 1 < len(messages) else None)
          for i in range(0, len(messages), 2)]


def render(messages: Sequence[dict], template: Template) -> str:
  """The conversation as text (EOS shown as sep2); ends with the assistant's role
  when the last turn is the human's, ready for generation."""
  out = []
  for k, (human, gpt) in enumerate(_pairs(messages)):
    inst, answer = _round_texts(human, gpt, template, first=k == 0)
    out.append(inst + (answer + template.sep2 if gpt is not None else ""))
  return "".join(out)


def _round_texts(human: str, gpt: str | None, template: Template, first: bool) -> tuple[str, str]:
  """(instruction text, answer text) of one round; the answer continues the instruction."""
  if template.style == "plain":
    # LLaVA's plain format: the human text is the image alone.
    return IMAGE_TOKEN, (gpt or "") + template.sep
  if template.style != "two":
    raise ValueError(f"unknown template style {template.style!r}; choose 'two' or 'plain'")
  user, assistant = template.roles
  prefix = template.system + template.sep if first and template.system else ""
  return f"{prefix}{user}: {human}{template.sep}{assistant}:", f" {gpt}" if gpt is not None else ""


def tokenize(messages: Sequence[dict], tokenizer, template: Template, *,
             max_len: int | None = None, sample_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
  """(tokens, labels) int32 [n]: BOS, then each round; labels -100 except on the
  assistant's answers and their EOS. A final human turn without an answer is a
  generation prompt (no labels). Longer than `max_len`: truncated."""
  tokens, labels = [tokenizer.bos_id], [IGNORE_INDEX]
  for k, (human, gpt) in enumerate(_pairs(messages)):
    inst_text, answer_text = _round_texts(human, gpt, template, first=k == 0)
    inst = tokenizer.encode(inst_text)
    if gpt is None:
      tokens += inst
      labels += [IGNORE_INDEX] * len(inst)
      continue
    full = tokenizer.encode(inst_text + answer_text)
    if full[:len(inst)] != inst:
      raise TokenizationMismatchError(
          f"sample {sample_id} round {k}: the instruction tokenises to {len(inst)} tokens "
          f"{inst[-4:]} alone but to {full[:len(inst)][-4:]} inside the round, so the label "
          f"mask would be off; template {template.name!r} needs separators that the "
          f"tokenizer splits at (text: {inst_text[-40:]!r} + {answer_text[:20]!r})")
    answer = full[len(inst):]
    if template.style == "two":
      answer = answer + [tokenizer.eos_id]
    tokens += full[:len(inst)] + answer
    labels += [IGNORE_INDEX] * len(inst) + answer
  tokens, labels = np.asarray(tokens, np.int32), np.asarray(labels, np.int32)
  if max_len is not None and len(tokens) > max_len:
    tokens, labels = tokens[:max_len], labels[:max_len]
  return tokens, labels


def pad_to(x: np.ndarray, length: int, value: int) -> np.ndarray:
  out = np.full((length,), value, np.int32)
  out[:min(len(x), length)] = x[:length]
  return out


# ---------------------------------------------------------------------------
# Questions and answers from a symbolic scene


QUESTION_TYPES = ("color", "shape", "count", "location", "relation", "existence", "size")

# Objects are named by what a 32 px image shows reliably: "the red shape" when
# its colour is unique in the scene, else "the red circle".
_COLOR_Q = ("What color is the {which}?", "What is the color of the {which}?",
            "Which color does the {which} have?")
_SHAPE_Q = ("What shape is the {which}?", "What is the shape of the {which}?")
_COUNT_Q = ("How many objects are there in the image?", "How many shapes are in the picture?",
            "Count the objects in the image.")
_LOCATION_Q = ("Where is {ref}?", "Where is {ref} in the image?",
               "In which part of the image is {ref}?")
_RELATION_Q = ("Where is {a} relative to {b}?", "Where is {a} compared to {b}?")
_EXIST_Q = ("Is there {a_color} shape in the image?", "Is there anything {color} in the picture?",
            "Does the image contain {a_color} object?")
_SIZE_Q = ("Is {ref} small or large?", "What size is {ref}?")
_DETAIL_Q = ("Describe the image in detail.", "What is in this image? Describe it in detail.",
             "Give a detailed description of the picture.")

_REL_ANSWER = {"to the left of": "To the left.", "to the right of": "To the right.",
               "above": "Above.", "below": "Below."}


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _scene_objects(scene: dict) -> list[dict]:
  """Objects with their centre and location taken from their box (context type 2)."""
  s = scene["image_size"]
  out = []
  for o in scene["objects"]:
    o = dict(o)
    if "box" in o:
      x0, y0, x1, y1 = o["box"]
      o["center"] = [(x0 + x1) / 2 * s, (y0 + y1) / 2 * s]
    o["place"] = shapes.location(o, s)
    o["name"] = shapes.object_name(o)
    out.append(o)
  return out


def _ref(o: dict, objs: list[dict]) -> str:
  """ "the red shape" when no other object is red, else "the red circle"."""
  if sum(p["color"] == o["color"] for p in objs) == 1:
    return f"the {o['color']} shape"
  return f"the {o['name']}"


ANSWER_STYLES = ("short", "restate")


def scene_questions(scene: dict, rng: np.random.Generator,
                    answers: str = "short") -> list[tuple[str, str, str]]:
  """One (type, question, answer) per applicable question type, in QUESTION_TYPES order.

  answers="short": a word or two ("In the top left.", "Yes."). "restate": the
  questions that name an object or a colour are answered with it first ("The
  red shape is in the top left.", "Anything red: yes."), so that the token that
  decides the answer comes after the one it is about, copied from the
  question: the look-up in the image is then one step, from a token of the
  answer itself. Colour, shape and count of the largest / all objects stay short either way."""
  if answers not in ANSWER_STYLES:
    raise ValueError(f"answers must be one of {ANSWER_STYLES}, got {answers!r}")
  restate = answers == "restate"
  objs = _scene_objects(scene)
  n = len(objs)
  out = []
  big = objs[0]  # the largest object
  which = "shape" if n == 1 else "largest shape"
  out.append(("color", _pick(rng, _COLOR_Q).format(which=which), _cap(big["color"]) + "."))
  which = "object" if n == 1 else "largest object"
  out.append(("shape", _pick(rng, _SHAPE_Q).format(which=which), _cap(big["shape"]) + "."))
  out.append(("count", _pick(rng, _COUNT_Q), _cap(shapes.NUMBER_WORDS[n]) + "."))
  o = _pick(rng, objs)
  ref = _ref(o, objs)
  out.append(("location", _pick(rng, _LOCATION_Q).format(ref=ref),
              _cap(f"{ref} is {o['place']}." if restate else f"{o['place']}.")))
  if n >= 2:
    i, j = rng.choice(n, size=2, replace=False)
    a, b = objs[int(i)], objs[int(j)]
    ra, rb, rel = _ref(a, objs), _ref(b, objs), shapes.relation(a, b)
    out.append(("relation", _pick(rng, _RELATION_Q).format(a=ra, b=rb),
                _cap(f"{ra} is {rel} {rb}.") if restate else _REL_ANSWER[rel]))
  out.append(_existence(objs, rng, answers)[1])
  o = _pick(rng, objs)
  ref = _ref(o, objs)
  out.append(("size", _pick(rng, _SIZE_Q).format(ref=ref),
              _cap(f"{ref} is {o['size']}." if restate else f"{o['size']}.")))
  return out


def _existence(objs: list[dict], rng: np.random.Generator, answers: str,
               avoid: Sequence[str] = ()) -> tuple[str, tuple[str, str, str]]:
  """(colour, ("existence", question, answer)): is there anything of a colour,
  present or absent with equal chance; not a colour in `avoid` while another
  one is left to ask about."""
  present = sorted({o["color"] for o in objs})
  yes = rng.random() < 0.5
  question = _pick(rng, _EXIST_Q)
  pool = present if yes else [c for c in shapes.COLOR_NAMES if c not in present]
  color = _pick(rng, [c for c in pool if c not in avoid] or pool)
  answer = "yes." if yes else "no."
  return color, ("existence", question.format(color=color, a_color=shapes.article(color)),
                 f"Anything {color}: {answer}" if answers == "restate" else _cap(answer))


def detailed_description(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
  """A question and a description that places every object (from its box)."""
  objs = _scene_objects(scene)
  n = len(objs)
  bg = shapes._background_word(scene)  # pylint: disable=protected-access
  if n == 1:
    parts = [f"The image shows a single shape on a {bg} background."]
  else:
    parts = [f"The image shows {shapes.NUMBER_WORDS[n]} shapes on a {bg} background."]
  for o in objs:
    parts.append(_cap(f"{shapes.article(o['size'] + ' ' + o['name'])} is {o['place']}."))
  if n >= 2:
    a, b = objs[0], objs[1]
    parts.append(f"The {a['name']} is {shapes.relation(a, b)} the {b['name']}.")
  q = _DETAIL_Q[int(rng.integers(len(_DETAIL_Q)))]
  return q, " ".join(parts)


def complex_reasoning(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
  """A question that needs several facts, answered briefly then explained."""
  objs = _scene_objects(scene)
  n = len(objs)
  if n == 1:
    o = objs[0]
    return (f"Is there anything in the image besides the {o['name']}?",
            f"No. The {o['name']} is the only shape, {o['place']}.")
  kind = int(rng.integers(3))
  if kind == 0:
    big = objs[0]
    return ("If the largest shape were removed, how many shapes would be left?",
            f"{_cap(shapes.NUMBER_WORDS[n - 1])}. There are {shapes.NUMBER_WORDS[n]} shapes and "
            f"the largest is the {big['name']}, so {shapes.NUMBER_WORDS[n - 1]} would remain.")
  if kind == 1:
    left = min(objs, key=lambda o: o["center"][0])
    others = [o for o in objs if o is not left]
    return ("Which shape is furthest to the left?",
            f"The {left['name']}. It is {left['place']}, to the left of the "
            + " and the ".join(o["name"] for o in others) + ".")
  colors = sorted({o["color"] for o in objs})
  same = len(colors) == 1
  listing = ", ".join(f"the {o['shape']} is {o['color']}" for o in objs)
  return ("Do all the shapes have the same color?",
          f"{'Yes' if same else 'No'}. {_cap(listing)}.")


def conversation(scene: dict, rng: np.random.Generator, num_turns: int,
                 answers: str = "short", existence_turns: int = 0) -> list[dict]:
  """A multi-turn LLaVA conversation of short questions, the image in the first turn.

  existence_turns=0: `num_turns` distinct question types, drawn uniformly.
  existence_turns=k: k of the turns ask whether a colour is present (each
  about its own colour, yes or no by its own draw), the others are distinct
  types drawn from the rest, in a random order. This sets the share of the
  answers that need a look-up of a colour in the image: drawn uniformly it is
  one in seven of the question types."""
  qs = scene_questions(scene, rng, answers)
  if existence_turns:
    if not 0 < existence_turns <= num_turns:
      raise ValueError(f"existence_turns must be in [0, num_turns={num_turns}], "
                       f"got {existence_turns}")
    objs, asked, exist = _scene_objects(scene), [], []
    for _ in range(existence_turns):  # (in place of scene_questions' one)
      color, q = _existence(objs, rng, answers, avoid=asked)
      asked.append(color)
      exist.append(q)
    others = [q for q in qs if q[0] != "existence"]
    others = [others[int(i)] for i in rng.permutation(len(others))[:num_turns - existence_turns]]
    qs = exist + others
  order = rng.permutation(len(qs))[:num_turns]
  turns = []
  for k, i in enumerate(order):
    _, q, a = qs[int(i)]
    turns.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + q})
    turns.append({"from": "gpt", "value": a})
  return turns


def grounded_conversation(scene: dict, rng: np.random.Generator, num_turns: int,
                          sid: str, answers: str = "short") -> dict:
  """A text-only record for the LM: the scene's description (every object with
  its size, colour, shape and place) in place of the image, then a conversation
  about it: text from which the LM can learn to answer questions about a
  scene before any image is involved (the LM's `eval/grounded_accuracy`
  measures how well it does on held-out scenes)."""
  _, description = detailed_description(scene, rng)
  turns = conversation(scene, rng, num_turns, answers)
  turns[0] = {"from": "human", "value": turns[0]["value"].replace(IMAGE_TOKEN, description, 1)}
  return {"id": sid, "conversations": turns}


def single_turn(question: str, answer: str | None = None, image_after: bool = False) -> list[dict]:
  """[human, gpt]: `<image>\\nquestion` (LLaVA's released layout), or
  `question\\n<image>` with `image_after` (the paper's other half)."""
  human = question + "\n" + IMAGE_TOKEN if image_after else IMAGE_TOKEN + "\n" + question
  turns = [{"from": "human", "value": human}]
  if answer is not None:
    turns.append({"from": "gpt", "value": answer})
  return turns


# ---------------------------------------------------------------------------
# Answers: normalisation for exact match


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, no punctuation or articles, digits as words, single spaces."""
  text = text.lower().translate(_PUNCT)
  text = _ARTICLES.sub(" ", text)
  words = [shapes.NUMBER_WORDS[int(w)] if w.isdigit() and int(w) <= 10 else w
           for w in text.split()]
  return " ".join(words)


def answer_matches(prediction: str, answer: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(answer)


# ---------------------------------------------------------------------------
# Prompts for a text LLM (the paper's way), instead of the rules above


_LLM_SYSTEM = {
    "conversation": (
        "You are an AI visual assistant, and you are seeing a single image. What you see is "
        "provided with several sentences describing the image, and the bounding boxes of its "
        "objects as normalised [x0, y0, x1, y1]. Design a conversation between you and a person "
        "asking about this photo: questions about the colours, shapes, number, positions, sizes "
        "and relative positions of the objects, each with a short answer of one to three words. "
        "Only ask questions that the image answers with certainty."),
    "detail": (
        "You are an AI visual assistant that can analyse a single image. You receive several "
        "sentences describing the image and the bounding boxes of its objects as normalised "
        "[x0, y0, x1, y1]. Describe the image in detail, placing every object using its box "
        "(top, bottom, left, right, center). Describe as if you were seeing the image."),
    "reasoning": (
        "You are an AI visual assistant that can analyse a single image. You receive several "
        "sentences describing the image and the bounding boxes of its objects as normalised "
        "[x0, y0, x1, y1]. Ask one question that needs several facts about the image to "
        "answer, then answer it: a short answer first, then the reasoning."),
}


def llm_prompt(kind: str, scene_text: str, example_text: str, example_response: str) -> list[dict]:
  """Chat messages for a text LLM: instruction, one few-shot pair, then the query."""
  return [{"role": "system", "content": _LLM_SYSTEM[kind]},
          {"role": "user", "content": example_text},
          {"role": "assistant", "content": example_response},
          {"role": "user", "content": scene_text}]


def context_text(captions: Sequence[str], boxes: str) -> str:
  """Context type 1 (captions) and type 2 (boxes), as the paper's prompts show them."""
  return "Captions:\n" + "\n".join(captions) + "\n\nBoxes:\n" + boxes


def _response_text(kind: str, scene: dict, rng, answers: str = "short") -> str:
  if kind == "conversation":
    turns = conversation(scene, rng, 4, answers)
    return "\n".join(("Question: " if t["from"] == "human" else "Answer: ")
                     + t["value"].replace(IMAGE_TOKEN + "\n", "") for t in turns)
  q, a = detailed_description(scene, rng) if kind == "detail" else complex_reasoning(scene, rng)
  return f"Question: {q}\nAnswer: {a}"


# ---------------------------------------------------------------------------
# Writing a dataset


@dataclasses.dataclass(frozen=True)
class Settings:
  num_train: int = 6000
  num_eval: int = 100
  image_size: int = 64
  seed: int = 0
  single_fraction: float = 0.3
  held_out_fraction: float = 0.15
  conversations_per_scene: int = 1
  turns: int = 4
  existence_turns: int = 2  # of each image conversation's `turns` (conversation())
  answers: str = "short"  # scene_questions' answer style: "short" or "restate"
  detail_fraction: float = 0.25
  reasoning_fraction: float = 0.4
  vocab_size: int = 1000
  grounded: bool = True  # grounded.json: the LM's text-only conversations
  emit_prompts: bool = False

  def name(self) -> str:
    return f"v{shapes.VERSION}-" + "-".join(f"{f.name.replace('_', '')}{getattr(self, f.name)}"
                    for f in dataclasses.fields(self) if f.name != "emit_prompts")


def default_dir(settings: Settings) -> str:
  root = os.environ.get("MMJAX_DATA_DIR") or os.path.expanduser("~/.cache/mmjax")
  return os.path.join(root, "shapes_instruct", settings.name())


def prepare(out: str | None = None, **kwargs) -> str:
  """Writes the dataset into `out` once (a settings file marks it done); returns `out`."""
  settings = Settings(**kwargs)
  out = os.path.abspath(out or default_dir(settings))
  marker = os.path.join(out, "settings.json")
  want = {**dataclasses.asdict(settings), "generator": shapes.VERSION}
  if _done(marker, want):
    return out
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # parallel processes: one writes, the rest wait
    if not _done(marker, want):
      _write(out, settings)
      with open(marker, "w") as f:
        json.dump(want, f, indent=2)
    fcntl.flock(lock, fcntl.LOCK_UN)
  return out


def _done(marker: str, want: dict) -> bool:
  """The folder holds data of these settings (and the prompts, if asked for)."""
  if not os.path.exists(marker):
    return False
  with open(marker) as f:
    have = json.load(f)
  if want["emit_prompts"] and not have.get("emit_prompts"):
    return False
  return {k: v for k, v in have.items() if k != "emit_prompts"} == {
      k: v for k, v in want.items() if k != "emit_prompts"}


def scene_example(settings: Settings, split: str, index: int) -> dict[str, Any]:
  """shapes.make_example of the scene that the dataset of `settings` holds at `index`."""
  return shapes.make_example(settings.seed, split, index, image_size=settings.image_size,
                             single_fraction=settings.single_fraction,
                             held_out_fraction=settings.held_out_fraction)


def _write(out: str, st: Settings) -> None:
  from PIL import Image
  captions, instruct, captions_eval, vqa_eval, corpus = [], [], [], [], []
  grounded, grounded_eval = [], []
  prompts: dict[str, list] = {"conversation": [], "detail": [], "reasoning": []}
  example_scene = None
  # Held-out scenes come from the validation split: unseen scenes, including
  # colour-shape pairs that the train split never shows.
  for split, folder, n in (("train", "train", st.num_train), ("validation", "eval", st.num_eval)):
    os.makedirs(os.path.join(out, "images", folder), exist_ok=True)
    for i in range(n):
      ex = scene_example(st, split, i)
      image = f"images/{folder}/{i:06d}.png"
      Image.fromarray(ex["image"]).save(os.path.join(out, image), compress_level=1)
      scene = json.loads(ex["scene"])
      rng = np.random.default_rng([st.seed, 7, split == "train", i])
      sid = f"{folder}-{i:06d}"
      if split == "train":
        for k, cap in enumerate(ex["captions"]):
          captions.append({"id": f"{sid}-cap{k}", "image": image, "conversations": [
              {"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": cap}]})
        for k in range(st.conversations_per_scene):
          turns = conversation(scene, rng, st.turns, st.answers, st.existence_turns)
          instruct.append({"id": f"{sid}-conv{k}", "image": image, "type": "conversation",
                           "conversations": turns})
        if rng.random() < st.detail_fraction:
          q, a = detailed_description(scene, rng)
          instruct.append({"id": f"{sid}-detail", "image": image, "type": "detail",
                           "conversations": single_turn(q, a)})
        if st.grounded:
          grounded.append(grounded_conversation(
              scene, np.random.default_rng([st.seed, 11, i]), st.turns, f"{sid}-text",
              st.answers))
        if rng.random() < st.reasoning_fraction:
          q, a = complex_reasoning(scene, rng)
          instruct.append({"id": f"{sid}-reasoning", "image": image, "type": "reasoning",
                           "conversations": single_turn(q, a)})
        corpus.extend(ex["captions"])
        if st.emit_prompts:
          if example_scene is None:
            example_scene = (ex, scene)
            continue
          ctx = context_text(ex["captions"], ex["boxes"])
          ex_ctx = context_text(example_scene[0]["captions"], example_scene[0]["boxes"])
          for kind in prompts:
            shot = _response_text(kind, example_scene[1], np.random.default_rng(i), st.answers)
            prompts[kind].append({"id": sid, "image": image,
                                  "messages": llm_prompt(kind, ctx, ex_ctx, shot)})
      else:
        captions_eval.append({"id": f"{sid}-cap0", "image": image, "conversations": [
            {"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": ex["captions"][0]}]})
        # (the generator only words the request with its rng: the text is the scene's)
        _, description = detailed_description(scene, np.random.default_rng(0))
        for k, (qtype, q, a) in enumerate(scene_questions(scene, rng, st.answers)):
          vqa_eval.append({"id": f"{sid}-{qtype}", "image": image, "question_type": qtype,
                           "answer": a, "conversations": single_turn(q, a)})
          if st.grounded:
            grounded_eval.append({"id": f"{sid}-{qtype}-text", "question_type": qtype,
                                  "answer": a, "conversations": [
                                      {"from": "human", "value": f"{description}\n{q}"},
                                      {"from": "gpt", "value": a}]})
  for record in instruct[:4000]:  # the tokenizer learns the QA words as whole pieces
    corpus.extend(t["value"].replace(IMAGE_TOKEN + "\n", "") for t in record["conversations"])
  corpus += shapes.tokenizer_corpus(st.seed, 0, image_size=st.image_size,
                                    held_out_fraction=st.held_out_fraction)
  corpus += [VICUNA_SYSTEM] * 50
  tok = tokenizer_lib.train_sentencepiece(corpus, st.vocab_size)
  tok.save(os.path.join(out, "tokenizer.model"))
  for name, records in (("captions", captions), ("instruct", instruct),
                        ("captions_eval", captions_eval), ("vqa_eval", vqa_eval),
                        ("grounded", grounded), ("grounded_eval", grounded_eval)):
    with open(os.path.join(out, f"{name}.json"), "w") as f:
      json.dump(records, f)
  if st.emit_prompts:
    os.makedirs(os.path.join(out, "prompts"), exist_ok=True)
    for kind, rows in prompts.items():
      with open(os.path.join(out, "prompts", f"{kind}.jsonl"), "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")


def load_json(path: str) -> list[dict]:
  with open(path) as f:
    return json.load(f)


def main(argv: Iterable[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mmjax.data.instruct",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  for f in dataclasses.fields(Settings):
    if f.type in ("bool", bool):
      parser.add_argument(f"--{f.name}", action="store_true", default=f.default)
    else:
      kind = {"int": int, "float": float}.get(f.type, type(f.default))
      parser.add_argument(f"--{f.name}", type=kind, default=f.default)
  args = parser.parse_args(list(argv) if argv is not None else None)
  kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
  out = prepare(args.out, **kwargs)
  sizes = {name: len(load_json(os.path.join(out, f"{name}.json")))
           for name in ("captions", "instruct", "captions_eval", "vqa_eval")}
  print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
  main()
