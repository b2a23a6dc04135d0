"""How many answers of one question type the LLM needs before it leaves chance.

  python -m research.lookup_plateau --out=runs/lookup_plateau [--runs=mix,existence_alone]

A study of stage 2 of experiments/llava_shapes.py without the vision tower: the
image tokens are *oracle* features, the colour of each patch read off the
pixels (one-hot over the 8 colours and the background), so whatever the LLM
fails to learn is its own part, not the tower's. Each image token is a
learned linear map of its one-hot; the tokens replace `<image>` in the real
single-turn instruction text (the launch's tokenizer, template and questions,
one question of every type per train scene), and the `nano` LM learns from
scratch at depth `--depth`. Every `--eval_every` steps it answers the
launch's held-out questions (`vqa_eval.json`), teacher-forced exact match per
type, and the study counts the answers of each type that it has trained on.

Runs (`--runs`): `existence_alone` (existence questions only), `mix` (all
seven types, uniformly), `mix_existence_x4` (the same with existence questions
drawn four times as often), `location_alone`, `mix_existence_location_x4`
(existence and location each drawn four times as often). `--image=after`
writes the question before the image (`question\\n<image>`), `--position=rowcol`
adds a row and a column one-hot to each token's colour, `--projector=mlp`
maps the one-hots through Dense-GELU-Dense and `--projector=outer` adds their
colour x place outer product (features that bind a colour to its place),
`--llm=num_kv_heads=4,...` overrides fields of the `nano` LM. Writes
OUT/results.json (every evaluation of every run), OUT/lookup_plateau.md (when
the `--focus` type first reached `--threshold`: after how many steps and how
many of its answers) and OUT/lookup_plateau.png (its accuracy against steps
and against its answers seen).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from experiments import common, llava_shapes
from mmjax.data import instruct, shapes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.models import llm as llm_lib

# name -> (question types, sampling weight per type, steps)
RUNS = {
    "existence_alone": (("existence",), {}, 600),
    "mix": (instruct.QUESTION_TYPES, {}, 3000),
    "mix_existence_x4": (instruct.QUESTION_TYPES, {"existence": 4.0}, 1500),
    "location_alone": (("location",), {}, 600),
    "mix_existence_location_x4": (instruct.QUESTION_TYPES, {"existence": 4.0, "location": 4.0},
                                  1500),
}
PROJECTORS = ("linear", "mlp", "outer")
MAX_TEXT = 40  # tokens of a single-turn row; the longest question and answer fit
BACKGROUND = len(shapes.COLOR_NAMES)
_LAUNCH = llava_shapes.get_config("stage=2")  # its template, system prompt and `<image>` id
IMAGE_ID = _LAUNCH.model.image_token_id


def patch_colors(image: np.ndarray, grid: int) -> np.ndarray:
  """int [grid * grid]: each patch's colour index (shapes.COLOR_NAMES), or
  BACKGROUND when under a quarter of its pixels are near one of the palette's."""
  palette = np.asarray(list(shapes.COLORS.values()), np.float32)
  size = image.shape[0] // grid
  x = image[:grid * size, :grid * size, :3].astype(np.float32)
  x = x.reshape(grid, size, grid, size, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1, 3)
  dist = np.linalg.norm(x[:, :, None] - palette[None, None], axis=-1)  # [patches, pixels, colours]
  nearest = np.where(dist.min(-1) < 30, dist.argmin(-1), BACKGROUND)
  out = np.full(grid * grid, BACKGROUND, np.int32)
  for k, row in enumerate(nearest):
    counts = np.bincount(row, minlength=BACKGROUND + 1)[:BACKGROUND]
    if counts.sum() >= size * size / 4:
      out[k] = counts.argmax()
  return out


def encode(question: str, answer: str, tok, template, num_image: int, image_after: bool = False):
  """(ids, labels, is_image) [MAX_TEXT - 1 + num_image]: the image tokens in
  place of `<image>` (ids 1 there: valid, never a label); 0 pads."""
  ids, labels = instruct.tokenize(instruct.single_turn(question, answer, image_after), tok,
                                  template)
  if len(ids) > MAX_TEXT:
    raise ValueError(f"{question!r} + {answer!r}: {len(ids)} tokens > MAX_TEXT {MAX_TEXT}")
  where = np.flatnonzero(ids == IMAGE_ID)
  if len(where) != 1:
    raise ValueError(f"{question!r}: {len(where)} <image> tokens (id {IMAGE_ID}), want 1")
  p = int(where[0])
  n = MAX_TEXT - 1 + num_image
  out_ids, out_labels = np.zeros(n, np.int32), np.full(n, -100, np.int32)
  is_image = np.zeros(n, bool)
  out_ids[:p], out_labels[:p] = ids[:p], labels[:p]
  out_ids[p:p + num_image], is_image[p:p + num_image] = 1, True
  rest = slice(p + num_image, num_image + len(ids) - 1)  # the text after `<image>`
  out_ids[rest], out_labels[rest] = ids[p + 1:], labels[p + 1:]
  return out_ids, out_labels, is_image


class OracleLLaVA(nn.Module):
  """One-hot patch colours (and, with `rowcol`, the patch's row and column
  one-hot) -> Dense -> spliced into the text -> the LLM."""
  cfg: llm_lib.LLMConfig
  grid: int
  rowcol: bool = False
  projector: str = "linear"  # linear | mlp | outer (PROJECTORS)

  @nn.compact
  def __call__(self, colors, ids, is_image):
    color = jax.nn.one_hot(colors, BACKGROUND + 1)
    feats = color
    if self.rowcol:
      k = jnp.arange(self.grid * self.grid)
      place = jnp.concatenate([jax.nn.one_hot(k // self.grid, self.grid),
                               jax.nn.one_hot(k % self.grid, self.grid)], -1)
      place = jnp.broadcast_to(place, colors.shape + place.shape[-1:])
      feats = jnp.concatenate([color, place], -1)
      if self.projector == "outer":  # one feature per (colour, row) and (colour, column)
        outer = color[..., :, None] * place[..., None, :]
        feats = jnp.concatenate([feats, outer.reshape(colors.shape + (-1,))], -1)
    elif self.projector == "outer":
      raise ValueError("projector 'outer' binds colours to places: it needs position 'rowcol'")
    if self.projector == "mlp":
      feats = nn.gelu(nn.Dense(self.cfg.width, name="projector_hidden")(feats), approximate=False)
    image = nn.Dense(self.cfg.width, name="projector")(feats)  # [B, N, D]
    llm = llm_lib.LLM(self.cfg, name="llm")
    text = llm.embed(ids)
    # the k-th image slot of a row takes image token k
    slot = jnp.clip(jnp.cumsum(is_image, 1) - 1, 0, self.grid ** 2 - 1)
    x = jnp.where(is_image[..., None], jnp.take_along_axis(image, slot[..., None], 1), text)
    logits, _ = llm(embeddings=x, padding=ids != 0)
    return logits


def build_data(args, data_dir: str):
  """Train rows (one question of every type per train scene) and the held-out
  questions, each as arrays plus its question type and image index."""
  tok = tokenizer_lib.load_tokenizer(os.path.join(data_dir, "tokenizer.model"))
  template = instruct.get_template(_LAUNCH.data.template, _LAUNCH.data.system_prompt)
  settings = instruct.Settings(num_train=args.num_train, num_eval=args.num_eval)
  grid = args.grid
  n_img = grid * grid
  after = args.image == "after"
  colors, rows = [], []
  for i in range(settings.num_train):
    ex = instruct.scene_example(settings, "train", i)
    colors.append(patch_colors(ex["image"], grid))
    rng = np.random.default_rng([settings.seed, 13, i])
    for qtype, q, a in instruct.scene_questions(json.loads(ex["scene"]), rng):
      rows.append((qtype, len(colors) - 1, *encode(q, a, tok, template, n_img, after)))
  images = {}
  for r in instruct.load_json(os.path.join(data_dir, "vqa_eval.json")):
    if r["image"] not in images:
      pixels = np.asarray(Image.open(os.path.join(data_dir, r["image"])).convert("RGB"))
      images[r["image"]] = len(colors)
      colors.append(patch_colors(pixels, grid))
    q = r["conversations"][0]["value"].replace(instruct.IMAGE_TOKEN + "\n", "")
    rows.append(("eval/" + r["question_type"], images[r["image"]],
                 *encode(q, r["answer"], tok, template, n_img, after)))
  return tok, np.stack(colors), rows


def _stack(rows):
  types = np.array([r[0] for r in rows])
  image, ids, labels, is_image = (np.stack([r[k] for r in rows]) for k in range(1, 5))
  return types, image, ids, labels, is_image


def train_run(args, name: str, colors, train, held_out, vocab_size: int) -> list[dict]:
  types_, weights, steps = RUNS[name]
  steps = args.steps or steps
  keep = np.isin(train[0], types_)
  t_types, t_img, t_ids, t_lab, t_is = (x[keep] for x in train)
  prob = np.array([weights.get(t, 1.0) for t in t_types])
  prob /= prob.sum()
  cfg = llm_lib.llm_config("nano", **{**llm_overrides(args.llm), "vocab_size": vocab_size,
                                      "depth": args.depth, "rope_theta": args.rope_theta})
  model = OracleLLaVA(cfg, args.grid, rowcol=args.position == "rowcol", projector=args.projector)
  params = model.init(jax.random.PRNGKey(args.seed), colors[t_img[:2]], t_ids[:2],
                      t_is[:2])["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, steps // 4), steps)
  tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0)
  opt_state = tx.init(params)
  colors_dev = jnp.asarray(colors)  # every scene's patch colours, on the device once

  def token_terms(p, img, ids, labels, is_image):
    logits = model.apply({"params": p}, colors_dev[img], ids, is_image)[:, :-1]
    target = labels[:, 1:]
    return logits, target, target >= 0

  def loss_fn(p, *batch):
    logits, target, valid = token_terms(p, *batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, target, 0))
    return (ce * valid).sum() / valid.sum()

  @jax.jit
  def step(p, o, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  @jax.jit
  def exact(p, *batch):
    logits, target, valid = token_terms(p, *batch)
    return jnp.all((logits.argmax(-1) == target) | ~valid, axis=1)

  rng = np.random.default_rng(args.seed)
  seen = collections.Counter()
  curve, start = [], time.time()
  for s in range(1, steps + 1):
    b = rng.choice(len(t_ids), args.batch, p=prob)
    seen.update(t_types[b].tolist())
    params, opt_state, loss = step(params, opt_state, t_img[b], t_ids[b], t_lab[b], t_is[b])
    if s % args.eval_every == 0 or s == steps:
      right = np.asarray(exact(params, *held_out[1:]))
      acc = {t[5:]: float(right[held_out[0] == t].mean()) for t in sorted(set(held_out[0]))}
      acc = {t: v for t, v in acc.items() if t in types_}
      in_run = np.isin(held_out[0], ["eval/" + t for t in types_])
      row = {"step": s, "loss": float(loss), "seconds": round(time.time() - start, 1),
             "accuracy_by_type": {t: round(v, 4) for t, v in acc.items()},
             "answers_seen": dict(seen),
             "accuracy": round(float(right[in_run].mean()), 4)}  # over the run's types
      curve.append(row)
      print(f"{name} step {s} loss {row['loss']:.3f} accuracy {row['accuracy']:.3f} "
            f"{ {t[:5]: round(v, 2) for t, v in acc.items()} } ({row['seconds']:.0f} s)",
            flush=True)
  return curve


def llm_overrides(text: str) -> dict:
  """ "num_heads=8,num_kv_heads=8" -> {"num_heads": 8, "num_kv_heads": 8}: fields of
  the nano LLMConfig, each typed like nano's value (experiments.common.parse_arg)."""
  own_flags = ("vocab_size", "depth", "rope_theta")
  for key in (item.partition("=")[0] for item in text.split(",")):
    if key in own_flags:
      raise ValueError(f"--llm: set {key} with its own flag (or the data), not --llm")
  nano = {k: v for k, v in dataclasses.asdict(llm_lib.llm_config("nano")).items()
          if k not in own_flags}
  given = common.parse_arg(text, **nano)
  return {k: v for k, v in given.items() if v != nano[k]}


def first_reaching(curve: list[dict], threshold: float, focus: str = "existence") -> dict | None:
  for row in curve:
    if row["accuracy_by_type"].get(focus, 0.0) >= threshold:
      return row
  return None


def write_report(args, results: dict) -> None:
  out, focus = args.out, args.focus
  lines = [f"| run | steps | {focus} share | first {focus} >= {args.threshold} | "
           f"{focus} answers seen then | final accuracy by type |", "|---|---|---|---|---|---|"]
  curves = {n: c for n, c in results["runs"].items() if focus in c[-1]["accuracy_by_type"]}
  for name, curve in curves.items():
    last = curve[-1]
    share = last["answers_seen"].get(focus, 0) / sum(last["answers_seen"].values())
    hit = first_reaching(curve, args.threshold, focus)
    when = f"step {hit['step']}" if hit else "not reached"
    seen = str(hit["answers_seen"].get(focus, 0)) if hit else "-"
    final = ", ".join(f"{t} {v:.2f}" for t, v in last["accuracy_by_type"].items())
    lines.append(f"| {name} | {last['step']} | {share:.2f} | {when} | {seen} | {final} |")
  with open(os.path.join(out, "lookup_plateau.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for name, curve in curves.items():
    acc = [r["accuracy_by_type"][focus] for r in curve]
    axes[0].plot([r["step"] for r in curve], acc, marker=".", label=name)
    seen = [r["answers_seen"].get(focus, 0) for r in curve]
    axes[1].plot(seen, acc, marker=".", label=name)
  axes[0].set_xlabel("training steps (batch %d)" % args.batch)
  axes[1].set_xlabel(f"{focus} answers trained on")
  axes[0].set_ylabel(f"held-out {focus} accuracy")
  for ax in axes:
    ax.axhline(args.threshold, color="grey", lw=0.5, ls="--")
    ax.grid(alpha=0.3)
  axes[1].legend()
  extra = "".join(f", {k}" for k in filter(None, args.llm.split(",")))
  fig.suptitle(f"oracle patch colours{' + row, column' if args.position == 'rowcol' else ''}"
               f" -> {args.projector} projector -> nano LM (depth {args.depth}, RoPE base "
               f"{args.rope_theta:g}{extra}, image {args.image} the question): the look-up "
               "plateau")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "lookup_plateau.png"), dpi=110)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m research.lookup_plateau",
                                   description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--out", required=True, help="output folder")
  add("--data", default=None,
      help="instruction data folder (default: the launch's, generated once)")
  add("--runs", default="existence_alone,mix,mix_existence_x4",
      help=f"comma-separated: {list(RUNS)}")
  add("--steps", type=int, default=0, help="steps of every run (0: each run's own)")
  add("--num_train", type=int, default=6000, help="train scenes (one question of every type each)")
  add("--num_eval", type=int, default=100, help="held-out scenes of the instruction data")
  add("--grid", type=int, default=8, help="image tokens per side (the tower's 8 x 8 patches)")
  add("--depth", type=int, default=2, help="LLM layers (the nano width, heads and MLP)")
  add("--rope_theta", type=float, default=10000.0,
      help="the LLM's RoPE base (nano's 1e4; 1e9 all but turns the rotation off)")
  add("--batch", type=int, default=32, help="questions per step")
  add("--lr", type=float, default=1e-3,
      help="peak learning rate (warmup 50 steps or a quarter of the run, cosine decay)")
  add("--eval_every", type=int, default=100, help="steps between evaluations")
  add("--image", choices=("before", "after"), default="before",
      help="`<image>\\nquestion` (the launch's) or `question\\n<image>`")
  add("--position", choices=("none", "rowcol"), default="none",
      help="rowcol: each image token also gets its row and column (one-hot)")
  add("--projector", choices=PROJECTORS, default="linear",
      help="the oracle's projector: linear, mlp (Dense-GELU-Dense) or outer (linear, plus the "
           "colour x row and colour x column products; needs --position=rowcol)")
  add("--llm", default="", help="overrides of the nano LM, e.g. num_kv_heads=4 or "
                                "width=256,num_heads=8,num_kv_heads=4,mlp_dim=768")
  add("--focus", choices=instruct.QUESTION_TYPES, default="existence",
      help="the question type that the table and the plot follow")
  add("--threshold", type=float, default=0.75, help="the --focus accuracy that counts as learned")
  add("--seed", type=int, default=0, help="init and batch order")
  args = parser.parse_args(argv)
  unknown = [n for n in args.runs.split(",") if n not in RUNS]
  if unknown:
    parser.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
  if args.projector == "outer" and args.position != "rowcol":
    parser.error("--projector=outer needs --position=rowcol (it binds colours to places)")
  try:
    llm_overrides(args.llm)
  except ValueError as e:
    parser.error(str(e))
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  names = args.runs.split(",")
  os.makedirs(args.out, exist_ok=True)
  data_dir = args.data or instruct.prepare(num_train=args.num_train, num_eval=args.num_eval)
  tok, colors, rows = build_data(args, data_dir)
  train = _stack([r for r in rows if not r[0].startswith("eval/")])
  held_out = _stack([r for r in rows if r[0].startswith("eval/")])
  path = os.path.join(args.out, "results.json")
  keys = ("data", "steps", "num_train", "num_eval", "grid", "depth", "rope_theta", "batch", "lr",
          "seed", "image", "position", "projector", "llm")
  # (defaults added later are left out: results of earlier studies compare equal)
  defaults = (("image", "before"), ("position", "none"), ("projector", "linear"), ("llm", ""))
  flags = {k: getattr(args, k) for k in keys if (k, getattr(args, k)) not in defaults}
  results = {"flags": flags,
             "device": jax.devices()[0].device_kind, "runs": {}}
  if os.path.exists(path):  # an interrupted study resumes: finished runs are kept
    with open(path) as f:
      done = json.load(f)
    if done["flags"] != results["flags"]:
      raise SystemExit(f"{path} holds runs with other flags {done['flags']}; "
                       "choose another --out or delete it")
    results["runs"] = done["runs"]
  for name in names:
    if name not in results["runs"]:
      results["runs"][name] = train_run(args, name, colors, train, held_out, tok.vocab_size)
      with open(path, "w") as f:
        json.dump(results, f, indent=1)
  write_report(args, {"runs": {n: results["runs"][n] for n in names}})
  return results


if __name__ == "__main__":
  main()
