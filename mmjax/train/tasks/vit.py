"""The ViT family's Tasks: supervised classification and the remedies for a ViT's
data hunger (the protocol: `mmjax.train.tasks.base.Task`).

  "vit"      a ViT classifier (class token, gap or map pooling; linear or conv
             stem); label smoothing, mixup and cutmix; DeiT hard-label
             distillation from a teacher run (`distill.teacher_workdir`) through
             a distillation token; fine-tuning from an MAE run (`init.mae_workdir`)
  "convnet"  a small ConvNet classifier: the distillation teacher
  "mae"      masked-autoencoder pretraining of a ViT encoder (no labels)

All three read {image, label} batches from the shared pipeline and report
`eval/top1` (or `eval/loss` for MAE) exactly over the whole eval split.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import checkpoint, parallel
from mmjax.data import classification, pipeline
from mmjax.eval import sharded
from mmjax.models import convnet as convnet_lib
from mmjax.models import mae as mae_lib
from mmjax.models import vit as vit_lib
from mmjax.models import vit_heads
from mmjax.convert.workdir import load_config as load_run_config
from mmjax.train.tasks.base import build_task, dataclass_from, register, with_shardings


# ---------------------------------------------------------------------------
# Classification losses and batch mixing (traced inside the step)


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """[B] int -> [B, C] float32: (1 - s) one-hot + s / C."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return onehot * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       weight: jax.Array | None = None) -> jax.Array:
  """Mean over the batch of -sum_c targets_c log softmax(logits)_c (weighted by
  `weight` [B], 0 where an example does not count, when given)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return _masked_mean(-jnp.sum(targets * logp, axis=-1), weight)


def _masked_mean(x: jax.Array, weight: jax.Array | None) -> jax.Array:
  if weight is None:
    return jnp.mean(x)
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup or cutmix of each example with its partner in the reversed batch (as timm).

  One lam ~ Beta(alpha, alpha) per batch; with both alphas > 0 cutmix is used with
  probability `switch_prob`. Cutmix pastes a box of area (1 - lam) from the
  partner, and lam becomes the exact area kept. Returns (images, targets, lam).
  """
  if not mixup_alpha and not cutmix_alpha:
    return images, targets, jnp.ones((), jnp.float32)
  k_mix, k_cut, k_switch, k_box = jax.random.split(rng, 4)
  partner_images, partner_targets = images[::-1], targets[::-1]
  lams, mixed = [], []
  if mixup_alpha:
    lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha).astype(jnp.float32)
    lams.append(lam)
    mixed.append(lam * images + (1.0 - lam) * partner_images)
  if cutmix_alpha:
    lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
    h, w = images.shape[1], images.shape[2]
    cut = jnp.sqrt(1.0 - lam)
    cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w], jnp.float32)
    y0, y1 = jnp.clip(cy - cut * h / 2, 0, h), jnp.clip(cy + cut * h / 2, 0, h)
    x0, x1 = jnp.clip(cx - cut * w / 2, 0, w), jnp.clip(cx + cut * w / 2, 0, w)
    rows = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
    cols = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
    lams.append(1.0 - jnp.mean(box.astype(jnp.float32)))
    mixed.append(jnp.where(box[None, :, :, None], partner_images, images))
  if len(mixed) == 2:
    use_cut = jax.random.uniform(k_switch) < switch_prob
    lam = jnp.where(use_cut, lams[1], lams[0])
    out = jnp.where(use_cut, mixed[1], mixed[0])
  else:
    lam, out = lams[0], mixed[0]
  return out.astype(images.dtype), lam * targets + (1.0 - lam) * partner_targets, lam


def top1_correct(probs: jax.Array, labels: jax.Array) -> jax.Array:
  return (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Shared by the classifiers


def num_classes(config) -> int:
  """model.num_classes, or (0) the dataset's class count."""
  n = int(config.model.get("num_classes", 0) or 0)
  return n or len(pipeline.class_names(config.data))


class ClassifierTask:
  """What every image classifier shares: {image, label} data, the smoothed and
  mixed cross-entropy, and exact top-1 over the eval split. Subclasses build
  `self.model` (apply -> (logits, out)) and say `forward_flops()`."""

  batch_keys = ("image", "label")

  def __init__(self, config, with_data: bool = True):
    del with_data  # the data is only read when batches are asked for
    self.config = config
    self.data_cfg = config.data
    self.num_classes = num_classes(config)
    self.loss_cfg = config.get("loss") or ml_collections.ConfigDict()
    self.frozen = tuple((config.get("optim") or {}).get("frozen", ()) or ())
    self._eval_fn = jax.jit(self.eval_rows)  # self.model comes from the subclass

  # -- model ----------------------------------------------------------------

  def init(self, rng):
    s = int(self.data_cfg.image_size)
    return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]

  def batch_spec(self, batch_size: int) -> dict:
    s = int(self.data_cfg.image_size)
    return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def apply(self, params, images, train: bool = False):
    return self.model.apply({"params": params}, images, train)

  def head_probs(self, params, images) -> dict[str, jax.Array]:
    """Class probabilities: "top1" the prediction (and any per-head ones)."""
    logits, _ = self.apply(params, images)
    return {"top1": vit_heads.predict_probs(logits)}

  def forward_flops(self) -> float:
    raise NotImplementedError

  def flops_per_example(self) -> float:
    return 3 * self.forward_flops()

  # -- loss -----------------------------------------------------------------

  def mixed_batch(self, batch, rng):
    c = self.loss_cfg
    targets = smooth_targets(batch["label"], self.num_classes,
                             float(c.get("label_smoothing", 0.0)))
    return mix_batch(rng, batch["image"], targets,
                     mixup_alpha=float(c.get("mixup_alpha", 0.0)),
                     cutmix_alpha=float(c.get("cutmix_alpha", 0.0)),
                     switch_prob=float(c.get("switch_prob", 0.5)))

  def loss(self, params, batch, rng):
    images, targets, _ = self.mixed_batch(batch, rng)
    logits, _ = self.apply(params, images, train=True)
    loss = soft_cross_entropy(logits, targets)
    return loss, {"top1": jnp.mean(top1_correct(logits, batch["label"]))}

  # -- data and evaluation ----------------------------------------------------

  def train_batches(self, batch_size: int, seed: int, **shard):
    return pipeline.train_iterator(
        self.data_cfg, batch_size=batch_size, seed=seed,
        example_fn=classification.ImageLabelExample(self.data_cfg), **shard)

  def eval_batches(self, batch_size: int):
    return pipeline.eval_iterator(self.data_cfg, split=self.data_cfg.eval_split,
                                  batch_size=batch_size,
                                  example_fn=classification.ImageLabelEvalExample(self.data_cfg))

  def eval_rows(self, params, batch) -> dict[str, jax.Array]:
    """Per row: whether each head's prediction is right, and the prediction's
    cross-entropy."""
    probs = self.head_probs(params, batch["image"])
    labels = batch["label"]
    out = {f"correct/{k}": jnp.argmax(p, axis=-1) == labels for k, p in probs.items()}
    p_true = jnp.take_along_axis(probs["top1"], jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    out["nll"] = -jnp.log(jnp.maximum(p_true.astype(jnp.float32), 1e-12))
    return out

  def evaluate(self, params, mesh, rules) -> dict[str, float]:
    """top1 (and each head's) and the cross-entropy of the prediction, over the
    whole eval split: every process predicts its shard, padding is dropped."""
    per_process = int(self.config.eval.batch_size) // jax.process_count()
    with parallel.activate(mesh, rules):
      rows = sharded.run_batches(lambda b: self._eval_fn(params, b),
                                 self.eval_batches(per_process), mesh)
    valid = rows["mask"]
    out = {k.split("/", 1)[1]: float(np.mean(v[valid])) for k, v in rows.items()
           if k.startswith("correct/")}
    out["loss"] = float(np.mean(rows["nll"][valid]))
    out["count"] = int(valid.sum())
    return out


def _vit_config(config, **overrides) -> vit_lib.ViTConfig:
  m = config.model
  return dataclass_from(vit_lib.ViTConfig, m.vision, image_size=int(config.data.image_size),
                    dtype=m.get("dtype", "float32"), scan=m.get("scan", True),
                    remat=m.get("remat", "none"), **overrides)


# ---------------------------------------------------------------------------
# "convnet"


@register("convnet")
class ConvNetTask(ClassifierTask):
  """A small ConvNet classifier (the distillation teacher). model: channels,
  convs_per_stage, groups, num_classes, dtype."""

  def __init__(self, config, with_data: bool = True):
    super().__init__(config, with_data)
    m = config.model
    self.model_config = dataclass_from(
        convnet_lib.ConvNetConfig, {k: v for k, v in m.to_dict().items() if k != "num_classes"},
        num_classes=self.num_classes, image_size=int(config.data.image_size))
    self.model = convnet_lib.ConvNet(self.model_config)

  def forward_flops(self) -> float:
    return convnet_lib.forward_flops(self.model_config)


# ---------------------------------------------------------------------------
# "vit"


@register("vit")
class ViTTask(ClassifierTask):
  """A ViT classifier. model.vision: the ViTConfig keys (variant, pool, stem, ...).

  `distill.teacher_workdir`: DeiT hard-label distillation. The ViT gets a
  distillation token and head; loss = (1 - w) CE(class head, targets) +
  w CE(distillation head, argmax teacher(x)) with w = `distill.weight` (0.5),
  on the same (mixed) images; the prediction averages both heads' softmax.
  The teacher is any classifier run (its config.json names its model); its
  params sit frozen under params/teacher. With `distill.unlabelled` and
  `data.label_fraction` < 1 the student also sees the train images whose labels
  were held back: the distillation head learns the teacher's labels on every
  image, the class head the true labels of the labelled subset only (batches
  carry a `labelled` flag; the other images' labels never reach the step).

  `init.mae_workdir`: start the encoder from an "mae" run's params/encoder.
  """

  def __init__(self, config, with_data: bool = True):
    super().__init__(config, with_data)
    distill = config.get("distill") or {}
    self.teacher_workdir = distill.get("teacher_workdir")
    self.distill_weight = float(distill.get("weight", 0.5))
    overrides = {"num_classes": self.num_classes}
    if self.teacher_workdir and "num_prefix_tokens" not in config.model.vision:
      overrides["num_prefix_tokens"] = 2  # class token, distillation token
    self.model_config = _vit_config(config, **overrides)
    self.model = vit_heads.ViTClassifier(self.model_config, distill=bool(self.teacher_workdir))
    self.teacher = None
    if self.teacher_workdir:
      self.teacher = _teacher_task(self.teacher_workdir, config, self.num_classes)
      self.frozen = self.frozen + ("teacher/.*",)
    self.unlabelled = bool(distill.get("unlabelled", False))
    if self.unlabelled:
      if not self.teacher_workdir:
        raise ValueError("distill.unlabelled needs a teacher (distill.teacher_workdir): "
                         "only the teacher labels the held-back images")
      if float(self.data_cfg.get("label_fraction", 1.0)) >= 1.0:
        raise ValueError("distill.unlabelled needs data.label_fraction < 1: with every "
                         "label kept there are no unlabelled images")
      self.batch_keys = ("image", "label", "labelled")

  def init(self, rng):
    student_rng, teacher_rng = jax.random.split(rng)
    params = super().init(student_rng)
    if self.teacher is not None:
      params = {**params, "teacher": self.teacher.init(teacher_rng)}
    return params

  def batch_spec(self, batch_size: int) -> dict:
    spec = super().batch_spec(batch_size)
    if self.unlabelled:
      spec["labelled"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return spec

  def train_batches(self, batch_size: int, seed: int, **shard):
    if not self.unlabelled:
      return super().train_batches(batch_size, seed, **shard)
    every = ml_collections.ConfigDict(self.data_cfg.to_dict())
    every.label_fraction = 1.0
    n = len(pipeline.make_source(every, every.train_split))
    labelled = pipeline.subset_indices(n, float(self.data_cfg.label_fraction),
                                       int(self.data_cfg.get("label_fraction_seed", 0) or 0))
    return pipeline.train_iterator(
        every, batch_size=batch_size, seed=seed,
        example_fn=classification.PartlyLabelledExample(every, labelled), **shard)

  def apply(self, params, images, train: bool = False):
    student = {k: v for k, v in params.items() if k != "teacher"}
    return self.model.apply({"params": student}, images, train)

  def head_probs(self, params, images) -> dict[str, jax.Array]:
    logits, out = self.apply(params, images)
    if self.teacher is None:
      return {"top1": vit_heads.predict_probs(logits)}
    return {"top1": vit_heads.predict_probs(logits, out["dist_logits"]),
            "top1_cls": vit_heads.predict_probs(logits),
            "top1_dist": vit_heads.predict_probs(out["dist_logits"])}

  def loss(self, params, batch, rng):
    if self.teacher is None:
      return super().loss(params, batch, rng)
    images, targets, lam = self.mixed_batch(batch, rng)
    logits, out = self.apply(params, images, train=True)
    teacher_logits, _ = self.teacher.apply(jax.lax.stop_gradient(params["teacher"]), images)
    teacher_labels = jnp.argmax(teacher_logits, axis=-1)
    known = batch.get("labelled")  # None: every example is labelled
    weight = None
    if known is not None:
      # The class head sees true labels only; a mixed example counts when both
      # of its images are labelled (mix_batch pairs the batch with its reverse).
      weight = known * jnp.where(lam < 1.0, known[::-1], 1.0)
    cls_loss = soft_cross_entropy(logits, targets, weight)
    dist_loss = soft_cross_entropy(out["dist_logits"],
                                   jax.nn.one_hot(teacher_labels, self.num_classes))
    w = self.distill_weight
    probs = vit_heads.predict_probs(logits, out["dist_logits"])
    return (1.0 - w) * cls_loss + w * dist_loss, {
        "cls_loss": cls_loss, "dist_loss": dist_loss,
        "top1": _masked_mean(top1_correct(probs, batch["label"]), known),
        "teacher_top1": _masked_mean(top1_correct(teacher_logits, batch["label"]), known)}

  def forward_flops(self) -> float:
    flops = vit_lib.forward_flops(self.model_config)
    if self.teacher is not None:
      flops += 2 * self.model_config.size["width"] * self.num_classes  # distillation head
    return flops

  def flops_per_example(self) -> float:
    # The frozen teacher runs forward only.
    teacher = self.teacher.forward_flops() if self.teacher is not None else 0.0
    return 3 * self.forward_flops() + teacher

  def initial_params(self, params, shardings):
    params = dict(params)
    if self.teacher is not None:
      params["teacher"] = checkpoint.restore_subtree(
          self.teacher_workdir, ("params",), with_shardings(params["teacher"],
                                                            shardings["teacher"]))
      logging.info("loaded the teacher from %s", self.teacher_workdir)
    mae_workdir = (self.config.get("init") or {}).get("mae_workdir")
    if mae_workdir:
      vit = dict(params["vit"])
      # Everything the MAE encoder has: not the head, nor a MAP pooling head.
      keys = [k for k in vit if k not in ("head", "map_head")]
      target = with_shardings({k: vit[k] for k in keys},
                               {k: shardings["vit"][k] for k in keys})
      vit.update(checkpoint.restore_subtree(mae_workdir, ("params", "encoder"), target))
      params["vit"] = vit
      logging.info("loaded the encoder from the MAE run %s", mae_workdir)
    return params


def _teacher_task(workdir: str, config, num_classes_: int) -> ClassifierTask:
  """The classifier task of a teacher run, built from its config.json, checked
  against the student's data (the teacher sees the student's images)."""
  teacher_cfg = load_run_config(workdir)
  task = build_task(teacher_cfg, with_data=False)
  if not isinstance(task, ClassifierTask):
    raise ValueError(f"distill.teacher_workdir {workdir} is a {teacher_cfg.task!r} run, not an "
                     f"image classifier ('convnet' or 'vit')")
  if task.num_classes != num_classes_:
    raise ValueError(f"the teacher in {workdir} has {task.num_classes} classes, the student "
                     f"{num_classes_}")
  for key in ("image_size", "transforms.normalize"):
    theirs, ours = teacher_cfg.data, config.data
    for part in key.split("."):
      theirs, ours = theirs[part], ours[part]
    if theirs != ours:
      raise ValueError(f"the teacher in {workdir} was trained with data.{key}={theirs!r}, this "
                       f"run has {ours!r}: the teacher must see images as it was trained")
  return task


# ---------------------------------------------------------------------------
# "mae"


@register("mae")
class MAETask:
  """Masked-autoencoder pretraining. model.vision: the encoder (stem 'linear');
  model.mae: mask_ratio, decoder_width, decoder_depth, decoder_heads,
  decoder_mlp_dim, norm_pix_loss. Labels are not read. eval/loss: the
  reconstruction loss on the eval split under a fixed mask."""

  batch_keys = ("image",)

  def __init__(self, config, with_data: bool = True):
    del with_data
    self.config = config
    self.data_cfg = config.data
    encoder = _vit_config(config, pool="none", num_classes=0)
    self.model_config = dataclass_from(mae_lib.MAEConfig, config.model.mae, encoder=encoder)
    self.model = mae_lib.MAE(self.model_config)
    self.frozen = tuple((config.get("optim") or {}).get("frozen", ()) or ())
    self._eval_fn = jax.jit(self.eval_sums)

  def _keep(self, rng, batch: int):
    return mae_lib.random_masking(rng, batch, self.model_config.encoder.num_patches,
                                  self.model_config.num_masked)

  def init(self, rng):
    s = int(self.data_cfg.image_size)
    keep, _ = self._keep(jax.random.PRNGKey(0), 1)
    return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32), keep)["params"]

  def batch_spec(self, batch_size: int) -> dict:
    s = int(self.data_cfg.image_size)
    return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32)}

  def loss(self, params, batch, rng):
    images = batch["image"]
    keep, mask = self._keep(rng, images.shape[0])
    pred, _ = self.model.apply({"params": params}, images, keep)
    cfg = self.model_config
    loss = mae_lib.mae_loss(pred, images, mask, cfg.encoder.size["patch_size"], cfg.norm_pix_loss)
    return loss, {"mask_fraction": jnp.mean(mask)}

  def flops_per_example(self) -> float:
    return 3 * mae_lib.forward_flops(self.model_config)

  def train_batches(self, batch_size: int, seed: int, **shard):
    return pipeline.train_iterator(
        self.data_cfg, batch_size=batch_size, seed=seed,
        example_fn=classification.ImageLabelExample(self.data_cfg), **shard)

  def eval_sums(self, params, batch) -> dict[str, jax.Array]:
    """The reconstruction loss summed over the masked patches of the real rows,
    and their count. Each image's mask is drawn from its record index, so it is
    the same whichever batch or process the image lands in."""
    cfg = self.model_config
    images = batch["image"]
    rngs = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(
        jnp.maximum(batch["index"], 0))
    keep, mask = jax.vmap(lambda r: self._keep(r, 1))(rngs)
    keep, mask = keep[:, 0], mask[:, 0]
    pred, _ = self.model.apply({"params": params}, images, keep)
    target = mae_lib.reconstruction_targets(images, cfg.encoder.size["patch_size"],
                                            cfg.norm_pix_loss)
    valid = batch["mask"].astype(jnp.float32)[:, None]
    per_patch = jnp.mean((pred - target) ** 2, axis=-1) * mask * valid
    return {"sum": jnp.sum(per_patch), "count": jnp.sum(mask * valid)}

  def evaluate(self, params, mesh, rules) -> dict[str, float]:
    per_process = int(self.config.eval.batch_size) // jax.process_count()
    with parallel.activate(mesh, rules):
      batches = pipeline.eval_iterator(self.data_cfg, split=self.data_cfg.eval_split,
                                       batch_size=per_process,
                                       example_fn=classification.ImageLabelEvalExample(self.data_cfg))
      out = sharded.run_batches(lambda b: self._eval_fn(params, b), batches, mesh)
    return {"loss": out["sum"] / max(out["count"], 1.0)}
