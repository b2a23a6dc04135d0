"""python -m mmjax.visualize --workdir=DIR [--out=DIR/pictures] [--num_images=8] [--image=PATH,...]

Pictures of a trained ViT or CLIP workdir (written by `mmjax.train` or
`mmjax.convert`), as in the ViT paper (Fig. 7) and the CLIP paper:

  patch_embedding_pca.png  the first 28 principal components of the patch-embedding
                           filters (none for the conv stem: it has no P x P filters)
  patch_embedding_pca_learned.png
                           the same for the filters minus their random initialisation,
                           for a run trained here (it has metrics.jsonl): a short run
                           leaves the init's noise in every direction that its
                           images never excite, and this shows what training wrote
  position_similarity.png  cosine similarity of each position embedding with all others,
                           laid out on the patch grid (the mean similarity to the
                           same row, the same column and the rest is printed)
  attention_rollout.png    attention rollout (Abnar & Zuidema, 2020) over input images
  zeroshot.png             CLIP only: each image beside its top-5 classes' zero-shot
                           probabilities, the true class marked

The images are the first --num_images single-object images of the eval split,
or the files given with --image (then no true class is known). The arrays come
from the pure functions `patch_embedding_components`, `position_similarity` and
`attention_rollout`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mmjax.convert import workdir as workdir_lib  # noqa: E402
from mmjax.data import pipeline, transforms  # noqa: E402
from mmjax.models import clip as clip_lib  # noqa: E402
from mmjax.models import vit  # noqa: E402

NUM_COMPONENTS = 28  # as in the ViT paper's Fig. 7
TOP_K = 5  # captions per zero-shot panel, as in the CLIP paper


def _define_flags() -> None:
  # Defined only when run as a program (mmjax.evaluate also defines --workdir).
  flags.DEFINE_string("workdir", None, "a ViT or CLIP workdir (mmjax.train or mmjax.convert)")
  flags.DEFINE_string("out", None, "folder for the PNGs (default: WORKDIR/pictures)")
  flags.DEFINE_integer("num_images", 8, "eval images for the rollout and zero-shot panels")
  flags.DEFINE_list("image", [], "image files (comma-separated) to use instead of eval images")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.mark_flags_as_required(["workdir"])


# ---------------------------------------------------------------------------
# The arrays behind the pictures


def patch_embedding_components(kernel: Any, patch: int, channels: int,
                               k: int = NUM_COMPONENTS) -> np.ndarray:
  """[k, P, P, C]: the leading principal components of the patch-embedding filters.

  `kernel` is the linear patch embedding [P*P*C, D] (rows in `vit.patchify`'s
  (py, px, c) order); its D columns are the filters. The components are
  orthonormal, ordered by explained variance, each signed so that its largest
  entry is positive. k is capped at the rank the filters allow.
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2 or kernel.shape[0] != patch * patch * channels:
    raise ValueError(f"patch_embed kernel has shape {kernel.shape}; expected "
                     f"[{patch}*{patch}*{channels}, width] for {patch}px patches")
  filters = kernel.T  # [D, P*P*C]
  centred = filters - filters.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  k = min(k, vt.shape[0])
  comps = vt[:k]
  signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
  comps = comps * signs[:, None]
  return comps.reshape(k, patch, patch, channels).astype(np.float32)


def position_similarity(pos_embed: Any, grid: int | tuple[int, int],
                        num_prefix: int = 1) -> np.ndarray:
  """[gh, gw, gh, gw]: cosine similarity of each grid position's embedding with all others.

  `pos_embed` is [num_prefix + gh*gw, D] (row-major grid after the prefix
  tokens, which are skipped); out[i, j] is the map for the patch at row i, column j.
  """
  gh, gw = (grid, grid) if isinstance(grid, int) else grid
  pos_embed = np.asarray(pos_embed, np.float64)
  if pos_embed.ndim != 2 or pos_embed.shape[0] != num_prefix + gh * gw:
    raise ValueError(f"pos_embed has shape {pos_embed.shape}; expected "
                     f"[{num_prefix} + {gh}*{gw}, width] for a {gh}x{gw} grid")
  e = pos_embed[num_prefix:]
  e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return (e @ e.T).reshape(gh, gw, gh, gw).astype(np.float32)


def row_column_similarity(sim: Any) -> dict[str, float]:
  """Mean similarity of a position with the others of its own row, of its own
  column, and with the rest, from `position_similarity`'s [gh, gw, gh, gw] maps.

  The ViT paper's pattern (each patch most like its own row and column) has
  both `row` and `column` above `other`.
  """
  sim = np.asarray(sim, np.float64)
  gh, gw = sim.shape[:2]
  i, j = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  same_row = i.ravel()[:, None] == i.ravel()[None, :]
  same_col = j.ravel()[:, None] == j.ravel()[None, :]
  flat = sim.reshape(gh * gw, gh * gw)
  return {"row": float(flat[same_row & ~same_col].mean()),
          "column": float(flat[same_col & ~same_row].mean()),
          "other": float(flat[~same_row & ~same_col].mean())}


def rollout_matrix(attention: Any) -> np.ndarray:
  """[B, N, N] attention rollout from per-layer weights [L, B, heads, N, N].

  Per layer: average the heads, add the identity (the residual path), renormalise
  the rows; then multiply through the layers, A_L ... A_1. Every row sums to 1.
  """
  attention = np.asarray(attention, np.float64)
  if attention.ndim != 5 or attention.shape[-1] != attention.shape[-2]:
    raise ValueError(f"attention weights have shape {attention.shape}; expected "
                     f"[layers, batch, heads, N, N]")
  n = attention.shape[-1]
  a = attention.mean(axis=2) + np.eye(n)  # [L, B, N, N]
  a = a / a.sum(axis=-1, keepdims=True)
  rollout = np.broadcast_to(np.eye(n), a.shape[1:])
  for layer in a:
    rollout = layer @ rollout
  return rollout.astype(np.float32)


def attention_rollout(attention: Any, grid: int | tuple[int, int],
                      num_prefix: int = 1) -> np.ndarray:
  """[B, gh, gw]: how much each patch flows into the class token, by attention rollout.

  `attention` is [L, B, heads, N, N] with N = num_prefix + gh*gw. Without a
  class token (num_prefix 0: gap or map pooling) it is the mean over all tokens' rows.
  """
  gh, gw = (grid, grid) if isinstance(grid, int) else grid
  rollout = rollout_matrix(attention)
  if rollout.shape[-1] != num_prefix + gh * gw:
    raise ValueError(f"attention over {rollout.shape[-1]} tokens does not fit "
                     f"{num_prefix} prefix tokens and a {gh}x{gw} grid")
  rows = rollout[:, 0] if num_prefix else rollout.mean(axis=1)
  return rows[:, num_prefix:].reshape(-1, gh, gw)


# ---------------------------------------------------------------------------
# A workdir's model


@dataclasses.dataclass
class Loaded:
  """A workdir's config, task, params, and its vision tower's config and params."""

  config: Any
  task: Any
  params: Any
  vit_config: vit.ViTConfig
  vit_path: tuple[str, ...]  # where the ViT's params sit in `params`
  embedder: Any = None  # mmjax.embed.Embedder for a CLIP workdir

  @property
  def vit_params(self) -> dict:
    p = self.params
    for key in self.vit_path:
      p = p[key]
    return p


def load(workdir: str, step: int | None = None) -> Loaded:
  """The latest (or `step`) checkpoint of a workdir, with its ViT found by structure."""
  config = workdir_lib.load_config(workdir)
  embedder = None
  if config.task == "clip":
    from mmjax import embed
    embedder = embed.Embedder(workdir, step)
    task, params = embedder.task, embedder.params
  else:
    import flax.linen as nn

    from mmjax.train import tasks
    task = tasks.build_task(config)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(task.init(jax.random.PRNGKey(0))))
    params = workdir_lib.restore_params(workdir, abstract, step)
  path = find_vit_params(params, workdir, frozen=getattr(task, "frozen", ()))
  cfg = find_vit_config(task, workdir)
  loaded = Loaded(config, task, params, cfg, path, embedder)
  rows = loaded.vit_params["pos_embed"].shape[0]
  if rows != cfg.num_prefix_tokens + cfg.num_patches:
    raise ValueError(f"{workdir}: pos_embed at {'/'.join(path)} has {rows} rows, the ViT config "
                     f"{cfg.num_prefix_tokens} + {cfg.num_patches}")
  return loaded


def initial_vit_params(loaded: Loaded) -> dict:
  """The ViT params that `mmjax.train` started this run from before any restore
  (`train.step.initial_params` for config.seed)."""
  from mmjax.train import step as step_lib

  params = jax.jit(lambda: step_lib.initial_params(loaded.task, int(loaded.config.seed)))()
  for key in loaded.vit_path:
    params = params[key]
  return params


def find_vit_params(params: dict, where: str = "params",
                    frozen: Sequence[str] = ()) -> tuple[str, ...]:
  """The path of the one sub-tree that is a ViT's params: pos_embed, encoder and a
  patch_embed or conv stem (a text tower has no stem). Of several, the frozen ones
  (regexes over param paths, as `optim.frozen`: a distillation teacher) are dropped."""
  found = []

  def walk(tree, path):
    if not isinstance(tree, dict):
      return
    if {"pos_embed", "encoder"} <= set(tree) and ("patch_embed" in tree or "stem" in tree):
      found.append(path)
      return
    for key, value in tree.items():
      walk(value, path + (key,))

  walk(params, ())
  if len(found) > 1 and frozen:
    found = [p for p in found
             if not any(re.fullmatch(f, "/".join(p + ("pos_embed",))) for f in frozen)]
  if len(found) != 1:
    names = ["/".join(p) or "<root>" for p in found]
    raise ValueError(f"{where}: expected one ViT in the params (a sub-tree with pos_embed, "
                     f"encoder and patch_embed or stem), found {names}")
  return found[0]


def find_vit_config(task: Any, where: str = "task") -> vit.ViTConfig:
  """The ViTConfig of a task's model: the model's own, or the one field of its config."""
  model = task.model
  if isinstance(model, vit.ViT):
    return model.config
  cfg = getattr(model, "config", None)
  found = []
  if isinstance(cfg, vit.ViTConfig):
    found.append(cfg)
  elif dataclasses.is_dataclass(cfg):
    found = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if isinstance(getattr(cfg, f.name), vit.ViTConfig)]
  if len(found) != 1:
    raise ValueError(f"{where}: {type(model).__name__} has {len(found)} ViTConfigs in its "
                     f"config; mmjax.visualize needs exactly one vision tower")
  return found[0]


def attention_weights(loaded: Loaded, images: np.ndarray) -> np.ndarray:
  """[L, B, heads, N, N]: the ViT's attention weights on normalised images [B, S, S, 3]."""
  cfg = loaded.vit_config
  model = vit.ViT(cfg, sow_attention=True)

  @jax.jit
  def run(params, x):
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    return vit.stacked_attention(state["intermediates"], cfg.size["depth"])

  return np.asarray(run(loaded.vit_params, jnp.asarray(images)), np.float32)


def zeroshot_probs(loaded: Loaded, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """CLIP: [B, classes] zero-shot probabilities (the dataset's prompt templates) and names."""
  e = loaded.embedder
  encode = jax.jit(lambda p, x: e.task.model.apply({"params": p}, x,
                                                    method=clip_lib.CLIP.encode_image))
  names = pipeline.class_names(loaded.config.data)
  image_embeds = np.asarray(encode(loaded.params, jnp.asarray(images)), np.float32)
  return e.zeroshot(image_embeds, names), names


def eval_images(loaded: Loaded, num: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` single-object images of the eval split (normalised) and their labels."""
  config, task = loaded.config, loaded.task
  if hasattr(task, "eval_batches"):  # a classifier task's own {image, label, mask} batches
    batches = task.eval_batches(max(num, 8))
  else:
    batches = pipeline.eval_iterator(config.data, tokenizer=getattr(task, "tokenizer", None),
                                     split=config.data.eval_split, batch_size=max(num, 8))
  images, labels = [], []
  for batch in batches:
    keep = batch["mask"].astype(bool)
    if "num_objects" in batch:  # scenes: the label names object 0 only
      keep &= batch["num_objects"] == 1
    images.extend(batch["image"][keep])
    labels.extend(batch["label"][keep])
    if len(images) >= num:
      break
  if not images:
    raise ValueError(f"the {config.data.eval_split!r} split of {config.data.name!r} has no "
                     f"single-object images; pass --image")
  return np.stack(images[:num]), np.asarray(labels[:num], np.int32)


# ---------------------------------------------------------------------------
# The pictures


def visualize(workdir: str, out: str | None = None, num_images: int = 8,
              image_paths: Sequence[str] = (), step: int | None = None) -> dict[str, str]:
  """Writes the PNGs; returns {picture name: path}."""
  missing = [p for p in image_paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"image files not found: {missing}")
  loaded = load(workdir, step)
  cfg, params = loaded.vit_config, loaded.vit_params
  size = cfg.size
  patch, grid = size["patch_size"], cfg.image_size // size["patch_size"]
  out = out or os.path.join(workdir, "pictures")
  os.makedirs(out, exist_ok=True)
  written = {}

  def save(fig, name):
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written[name] = path

  if "patch_embed" in params:
    kernel = np.asarray(params["patch_embed"]["kernel"])
    save(plot_components(patch_embedding_components(kernel, patch, 3)), "patch_embedding_pca")
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      learned = kernel - np.asarray(initial_vit_params(loaded)["patch_embed"]["kernel"])
      save(plot_components(patch_embedding_components(learned, patch, 3),
                           "minus their random initialisation"), "patch_embedding_pca_learned")
  else:
    print(f"no patch_embedding_pca.png: the {cfg.stem!r} stem has no {patch}x{patch} patch "
          f"filters to decompose (its first layer is a stack of 3x3 convs)")
  sim = position_similarity(params["pos_embed"], grid, cfg.num_prefix_tokens)
  save(plot_position_similarity(sim), "position_similarity")
  rc = row_column_similarity(sim)
  print("position similarity, mean over the grid: same row {row:.3f}, same column "
        "{column:.3f}, elsewhere {other:.3f}".format(**rc))

  data = loaded.config.data
  mode = data.transforms.normalize
  if image_paths:
    images = np.stack([transforms.preprocess_image(
        p, cfg.image_size, mode, pad_square=bool(data.transforms.get("pad_to_square", False)))
        for p in image_paths])
    labels = None
    captions = [os.path.basename(p) for p in image_paths]
  else:
    images, labels = eval_images(loaded, num_images)
    names = pipeline.class_names(data)
    captions = [names[i] for i in labels]
  shown = transforms.denormalize(images, mode)
  rollout = attention_rollout(attention_weights(loaded, images), grid, cfg.num_prefix_tokens)
  save(plot_rollout(shown, rollout, captions, size["depth"], cfg.num_prefix_tokens > 0),
       "attention_rollout")

  if loaded.embedder is not None:
    probs, names = zeroshot_probs(loaded, images)
    save(plot_zeroshot(shown, probs, names, labels), "zeroshot")
  return written


def plot_components(comps: np.ndarray, subtitle: str = "", cols: int = 7):
  """A grid of principal components, each scaled to [0, 1] on its own (RGB)."""
  k = len(comps)
  rows = -(-k // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.2 + 0.5), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= k:
      continue
    c = comps[i]
    c = (c - c.min()) / max(float(c.max() - c.min()), 1e-12)
    ax.imshow(c if c.shape[-1] == 3 else c[..., 0], cmap=None if c.shape[-1] == 3 else "gray",
              interpolation="nearest")
    ax.set_title(f"PC {i + 1}", fontsize=7)
  fig.suptitle(f"RGB embedding filters{' ' + subtitle if subtitle else ''}\n"
               f"(first {k} principal components)", fontsize=10)
  return fig


def plot_position_similarity(sim: np.ndarray):
  """The [gh, gw] similarity map of every patch, tiled on the patch grid."""
  gh, gw = sim.shape[:2]
  gap = 1
  mosaic = np.full((gh * (gh + gap) - gap, gw * (gw + gap) - gap), np.nan, np.float32)
  for i in range(gh):
    for j in range(gw):
      r, c = i * (gh + gap), j * (gw + gap)
      mosaic[r:r + gh, c:c + gw] = sim[i, j]
  fig, ax = plt.subplots(figsize=(6, 5.4))
  cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # white between the maps
  im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
  step = max(1, gw // 8)
  ax.set_xticks([j * (gw + gap) + (gw - 1) / 2 for j in range(0, gw, step)],
                [str(j + 1) for j in range(0, gw, step)])
  step = max(1, gh // 8)
  ax.set_yticks([i * (gh + gap) + (gh - 1) / 2 for i in range(0, gh, step)],
                [str(i + 1) for i in range(0, gh, step)])
  ax.tick_params(length=0)
  for side in ax.spines.values():
    side.set_visible(False)
  ax.set_xlabel("Input patch column")
  ax.set_ylabel("Input patch row")
  ax.set_title("Position embedding similarity")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
  return fig


def plot_rollout(images: np.ndarray, rollout: np.ndarray, captions: Sequence[str],
                 depth: int, class_token: bool):
  """Each image above the same image under its rollout map (scaled per image)."""
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.2), squeeze=False)
  h, w = images.shape[1:3]
  for i in range(n):
    top, bottom = axes[0, i], axes[1, i]
    top.imshow(images[i])
    top.set_title(captions[i], fontsize=7, wrap=True)
    m = rollout[i]
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    bottom.imshow(images[i])
    bottom.imshow(m, cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                  interpolation="bilinear")
    top.axis("off")
    bottom.axis("off")
  who = "the class token" if class_token else "all tokens (mean)"
  fig.suptitle(f"Attention rollout over {depth} layers: what flows into {who}", fontsize=10)
  return fig


def plot_zeroshot(images: np.ndarray, probs: np.ndarray, names: Sequence[str],
                  labels: np.ndarray | None, cols: int = 2):
  """CLIP-paper panels: the image, then its top-5 classes' probabilities; true class green."""
  n = len(images)
  rows = -(-n // cols)
  fig = plt.figure(figsize=(cols * 6.0, rows * 2.2))
  grid = fig.add_gridspec(rows, cols * 2, width_ratios=[1, 1.8] * cols, wspace=0.1,
                          hspace=0.45)
  k = min(TOP_K, probs.shape[1])
  for i in range(n):
    r, c = divmod(i, cols)
    ax_img = fig.add_subplot(grid[r, 2 * c])
    ax_bar = fig.add_subplot(grid[r, 2 * c + 1])
    ax_img.imshow(images[i])
    ax_img.axis("off")
    top = np.argsort(-probs[i])[:k]
    true = None if labels is None else int(labels[i])
    colours = ["tab:green" if j == true else "tab:orange" for j in top]
    y = np.arange(k)
    ax_bar.barh(y, probs[i][top], color=colours, height=0.8)
    ax_bar.set_yticks([])
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1)
    ax_bar.tick_params(axis="x", labelsize=7)
    for spine in ("top", "right", "left"):
      ax_bar.spines[spine].set_visible(False)
    for yy, j in zip(y, top):  # the caption on its bar, as in the CLIP paper
      ax_bar.text(0.01, yy, f"{names[j]}  {probs[i][j]:.2f}", va="center", fontsize=8)
    if true is None:
      ax_img.set_title("(no label)", fontsize=8)
    else:
      rank = int(np.sum(probs[i] > probs[i][true])) + 1
      mark = "correct" if rank == 1 else f"true class rank {rank}, p={probs[i][true]:.2f}"
      ax_img.set_title(f"{names[true]}\n({mark})", fontsize=8)
  fig.suptitle("Zero-shot classification (green: the true class)", fontsize=11)
  return fig


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmjax import cli
  cli.init_process()
  f = flags.FLAGS
  if f.num_images < 1:
    raise app.UsageError("--num_images must be at least 1")
  written = visualize(f.workdir, f.out, f.num_images, f.image, f.step)
  for path in written.values():
    print(f"wrote {path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
