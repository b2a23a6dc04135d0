"""ViT on its own: classification losses and mixing, the distillation token, MAE's
masking, the label-fraction subset, and the tasks on the real loop."""

import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import init_params
from experiments import convnet_digits, mae_digits, vit_digits
from mmjax.data import classification, pipeline
from mmjax.models import mae as mae_lib
from mmjax.models import vit as vit_lib
from mmjax.models import vit_heads
from mmjax.train import loop, tasks
from mmjax.train.tasks import vit as vit_tasks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny(config, data_dir, **overrides):
  """A config shrunk to a tiny model on 16 px digits."""
  config.data.data_dir = data_dir
  config.data.image_size = 16
  config.batch_size, config.eval.batch_size = 16, 64
  config.async_checkpoints = False
  if "vision" in config.model:
    config.model.vision.variant = "tiny/4"
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


# -- classification losses and mixing ---------------------------------------

def test_label_smoothing_targets_and_loss():
  t = vit_tasks.smooth_targets(jnp.array([0, 2]), 4, 0.1)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(t[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
  logits = jax.random.normal(jax.random.key(0), (2, 4))
  hard = vit_tasks.soft_cross_entropy(logits, vit_tasks.smooth_targets(jnp.array([0, 2]), 4))
  want = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).mean()
  np.testing.assert_allclose(hard, want, rtol=1e-5)
  smooth = vit_tasks.soft_cross_entropy(logits, t)
  assert not np.isclose(smooth, hard)


def test_mixup_mixes_images_and_targets_with_the_reversed_batch():
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  targets = vit_tasks.smooth_targets(jnp.arange(4), 5)
  mix = jax.jit(functools.partial(vit_tasks.mix_batch, mixup_alpha=0.8))
  out, mixed, lam = mix(jax.random.key(2), images, targets)
  chex.assert_shape(out, images.shape)
  chex.assert_shape(mixed, targets.shape)
  assert 0.0 <= float(lam) <= 1.0
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(mixed[0, 0], lam, rtol=1e-5)
  np.testing.assert_allclose(mixed[0, 3], 1 - lam, rtol=1e-5, atol=1e-6)


def test_cutmix_lam_is_the_area_kept():
  images = jnp.zeros((2, 16, 16, 1)).at[1].set(1.0)  # partner of row 0 is all ones
  targets = vit_tasks.smooth_targets(jnp.array([0, 1]), 2)
  mix = jax.jit(functools.partial(vit_tasks.mix_batch, cutmix_alpha=1.0))
  for seed in range(5):
    out, mixed, lam = mix(jax.random.key(seed), images, targets)
    pasted = float(out[0].mean())  # fraction of row 0 that came from row 1
    np.testing.assert_allclose(1 - pasted, lam, atol=1e-6)
    np.testing.assert_allclose(mixed[0], [lam, 1 - lam], atol=1e-6)


def test_no_mixing_returns_the_batch_unchanged():
  images = jnp.ones((2, 4, 4, 3))
  targets = vit_tasks.smooth_targets(jnp.array([0, 1]), 3)
  out, mixed, lam = vit_tasks.mix_batch(jax.random.key(0), images, targets)
  assert out is images and mixed is targets and float(lam) == 1.0


# -- the distillation token ---------------------------------------------------

def test_distillation_token_and_averaged_prediction():
  cfg = vit_lib.ViTConfig(variant="tiny/4", image_size=16, num_classes=5, num_prefix_tokens=2)
  model = vit_heads.ViTClassifier(cfg, distill=True)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  params = init_params(model, x)
  assert params["vit"]["cls_token"].shape == (2, 32)  # class and distillation tokens
  assert params["vit"]["pos_embed"].shape == (2 + 16, 32)
  # Zero-initialised heads would hide a mix-up of the two tokens: randomise them.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  chex.assert_shape([logits, out["dist_logits"]], (3, 5))
  tokens = out["tokens"]
  dense = lambda p, v: v @ p["kernel"] + p["bias"]  # noqa: E731
  np.testing.assert_allclose(out["dist_logits"], dense(params["dist_head"], tokens[:, 1]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, dense(params["vit"]["head"], tokens[:, 0]),
                             rtol=1e-5, atol=1e-5)
  probs = vit_heads.predict_probs(logits, out["dist_logits"])
  want = (jax.nn.softmax(logits) + jax.nn.softmax(out["dist_logits"])) / 2
  np.testing.assert_allclose(probs, want, rtol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="num_prefix_tokens >= 2"):
    jax.eval_shape(vit_heads.ViTClassifier(
        vit_lib.ViTConfig(variant="tiny/4", image_size=16, num_classes=5), distill=True).init,
        jax.random.key(0), x)


# -- MAE ------------------------------------------------------------------------

def test_mae_mask_hides_exactly_the_chosen_fraction():
  keep, mask = jax.jit(mae_lib.random_masking, static_argnums=(1, 2, 3))(
      jax.random.key(0), 6, 64, 48)
  chex.assert_shape(keep, (6, 16))
  chex.assert_shape(mask, (6, 64))
  np.testing.assert_array_equal(mask.sum(-1), 48)
  for row_keep, row_mask in zip(np.asarray(keep), np.asarray(mask)):
    assert len(set(row_keep)) == 16 and np.all(np.diff(row_keep) > 0)
    np.testing.assert_array_equal(np.flatnonzero(row_mask == 0), row_keep)
  assert len({tuple(k) for k in np.asarray(keep)}) > 1  # a different mask per image
  cfg = mae_lib.MAEConfig(encoder=vit_lib.ViTConfig(variant="tiny/4", image_size=32),
                          mask_ratio=0.75)
  assert cfg.num_masked == 48


def _tiny_mae():
  enc = vit_lib.ViTConfig(variant="tiny/4", image_size=16, pool="none")
  return mae_lib.MAE(mae_lib.MAEConfig(encoder=enc, decoder_width=16, decoder_depth=1,
                                       decoder_heads=2, decoder_mlp_dim=32))


def test_mae_encoder_never_sees_masked_patches():
  model = _tiny_mae()
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  keep, mask = jax.jit(mae_lib.random_masking, static_argnums=(1, 2, 3))(
      jax.random.key(1), 2, 16, 12)
  params = init_params(model, images, keep)
  apply = jax.jit(lambda x: model.apply({"params": params}, x, keep))
  pred, out = apply(images)
  chex.assert_shape(out["tokens"], (2, 1 + 4, 32))  # class token + the 4 visible patches
  chex.assert_shape(pred, (2, 16, 4 * 4 * 3))
  pixel_mask = mask.reshape(2, 4, 4).repeat(4, 1).repeat(4, 2)[..., None]  # [B, 16, 16, 1]
  noise = 10 * jax.random.normal(jax.random.key(2), images.shape)
  pred2, out2 = apply(images + noise * pixel_mask)  # only masked pixels change
  np.testing.assert_allclose(out2["tokens"], out["tokens"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pred2, pred, rtol=1e-6, atol=1e-6)
  _, out3 = apply(images + noise * (1 - pixel_mask))  # visible pixels change: it shows
  assert not np.allclose(out3["tokens"], out["tokens"], atol=1e-3)


def test_mae_loss_counts_masked_patches_only_on_normalised_pixels():
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  target = jax.jit(mae_lib.reconstruction_targets, static_argnums=1)(images, 4)
  np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(target.std(-1), 1.0, rtol=1e-3)
  mask = jnp.array([[1.0, 0, 1, 0], [0, 0, 0, 1]])
  pred = jnp.zeros_like(target)
  loss = jax.jit(mae_lib.mae_loss, static_argnums=3)
  base = loss(pred, images, mask, 4)
  np.testing.assert_allclose(base, 1.0, rtol=1e-3)  # predicting the mean of unit-variance targets
  moved = pred.at[0, 1].set(100.0).at[1, 0].set(-7.0)  # visible patches only
  np.testing.assert_allclose(loss(moved, images, mask, 4), base, rtol=1e-6)
  assert float(loss(pred.at[0, 0].set(5.0), images, mask, 4)) > float(base) + 1


def test_vit_keep_all_patches_matches_no_keep_and_conv_stem_refuses():
  cfg = vit_lib.ViTConfig(variant="tiny/4", image_size=16, pool="none")
  model = vit_lib.ViT(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = init_params(model, x)
  apply = jax.jit(lambda x, keep: model.apply({"params": params}, x, keep=keep)[1])
  full = apply(x, None)
  kept = apply(x, jnp.tile(jnp.arange(16), (2, 1)))
  np.testing.assert_allclose(kept["tokens"], full["tokens"], rtol=1e-6, atol=1e-6)
  conv = vit_lib.ViT(vit_lib.ViTConfig(variant="tiny/4", image_size=16, pool="none",
                                       stem="conv"))
  with pytest.raises(ValueError, match="stem='linear'"):
    jax.eval_shape(conv.init, jax.random.key(0), x, keep=jnp.zeros((2, 4), jnp.int32))


def test_transpose_augmentation_swaps_half_the_images():
  cfg = mae_digits.get_config("runlocal=true,transpose=true").data
  cfg.transforms.random_resized_crop = False
  cfg.image_size = 8
  image = np.zeros((8, 8, 3), np.uint8)
  image[0] = 255  # the top row white
  example = classification.ImageLabelExample(cfg)
  rng = np.random.default_rng(0)
  outs = [example.random_map((0, {"bad": False, "image": image, "label": 3}), rng)["image"]
          for _ in range(64)]
  top = sum(bool((o[0] > o[1:].max()).all()) for o in outs)
  left = sum(bool((o[:, 0] > o[:, 1:].max()).all()) for o in outs)
  assert top + left == 64 and 16 < left < 48


# -- the label fraction -----------------------------------------------------------

def test_subset_indices_are_fixed_and_sized():
  a = pipeline.subset_indices(1438, 0.1, seed=0)
  assert len(a) == 144 and len(set(a)) == 144 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(a, pipeline.subset_indices(1438, 0.1, seed=0))
  assert not np.array_equal(a, pipeline.subset_indices(1438, 0.1, seed=1))
  with pytest.raises(ValueError, match="label_fraction"):
    pipeline.subset_indices(10, 0.0)


def test_label_fraction_trains_on_the_subset_only(data_dir):
  cfg = tiny(vit_digits.get_config("labels=0.05"), data_dir)
  cfg.data.return_index = True
  it = pipeline.train_iterator(cfg.data, batch_size=16, seed=0)
  assert len(it.source) == 72  # 5% of the 1438 train digits
  allowed = set(pipeline.subset_indices(1438, 0.05, 0).tolist())
  seen = set()
  for _ in range(10):  # more than two epochs of the subset
    seen |= set(next(it)["index"].tolist())
  assert seen == allowed
  it.close()


# -- the tasks on the real loop ---------------------------------------------------------

@pytest.mark.slow
def test_vit_digits_runlocal_trains_through_the_loop(data_dir, tmp_path):
  cfg = tiny(vit_digits.get_config("runlocal=true,mixup=0.8,cutmix=1.0"), data_dir)
  cfg.total_steps, cfg.checkpoint_every, cfg.eval_every = 8, 8, 8
  out = loop.train(cfg, str(tmp_path / "vit"))
  assert out["step"] == 8 and np.isfinite(out["train/loss"])
  assert out["eval/count"] == 359 and 0.0 <= out["eval/top1"] <= 1.0
  rows = [json.loads(line) for line in open(tmp_path / "vit" / "metrics.jsonl")]
  assert any("train/top1" in r for r in rows)
  assert os.path.exists(tmp_path / "vit" / "report.png")


@pytest.mark.slow
def test_distillation_from_a_teacher_run_and_fine_tuning_from_mae(data_dir, tmp_path):
  teacher_dir, mae_dir = str(tmp_path / "teacher"), str(tmp_path / "mae")
  teacher_cfg = tiny(convnet_digits.get_config("runlocal=true,width=8"), data_dir)
  teacher_cfg.total_steps = teacher_cfg.checkpoint_every = 4
  loop.train(teacher_cfg, teacher_dir)
  mae_cfg = tiny(mae_digits.get_config("runlocal=true,decoder_width=16"), data_dir)
  mae_cfg.total_steps = mae_cfg.checkpoint_every = mae_cfg.eval_every = 4
  mae_out = loop.train(mae_cfg, mae_dir)
  assert np.isfinite(mae_out["eval/loss"]) and mae_out["train/mask_fraction"] == 0.75

  # Distillation: the teacher is loaded frozen beside the student.
  cfg = tiny(vit_digits.get_config(f"runlocal=true,teacher={teacher_dir}"), data_dir)
  cfg.total_steps = cfg.checkpoint_every = cfg.eval_every = 3
  task = tasks.build_task(cfg)
  assert task.model_config.num_prefix_tokens == 2 and "teacher/.*" in task.frozen
  out = loop.train(cfg, str(tmp_path / "student"))
  for key in ("eval/top1", "eval/top1_cls", "eval/top1_dist", "train/dist_loss",
              "train/teacher_top1"):
    assert key in out, key
  s = loop.setup(cfg, str(tmp_path / "student"))
  state, _ = s["ckpt"].restore(loop.restore_target(s["abstract"], s["shardings"]))
  s["ckpt"].close()
  t = loop.setup(teacher_cfg, teacher_dir)
  teacher_state, _ = t["ckpt"].restore(loop.restore_target(t["abstract"], t["shardings"]))
  t["ckpt"].close()
  chex.assert_trees_all_close(state.params["teacher"], teacher_state.params)
  _check_distillation_on_unlabelled_images(data_dir, teacher_dir, tmp_path)

  # Fine-tuning from MAE: the encoder starts from the MAE run's.
  ft = tiny(vit_digits.get_config(f"runlocal=true,mae={mae_dir}"), data_dir)
  s = loop.build(ft)
  params = jax.jit(lambda: nn.meta.unbox(s["task"].init(jax.random.PRNGKey(0))))()
  loaded = s["task"].initial_params(params, s["shardings"].params)
  m = loop.setup(mae_cfg, mae_dir)
  mae_state, _ = m["ckpt"].restore(loop.restore_target(m["abstract"], m["shardings"]))
  m["ckpt"].close()
  chex.assert_trees_all_close({k: v for k, v in loaded["vit"].items() if k != "head"},
                              mae_state.params["encoder"])
  chex.assert_trees_all_equal(loaded["vit"]["head"], params["vit"]["head"])


def _check_distillation_on_unlabelled_images(data_dir, teacher_dir, tmp_path):
  """distill.unlabelled: every train image, labels only for the labelled subset,
  and the class head's loss blind to the others' labels."""
  cfg = tiny(vit_digits.get_config(f"runlocal=true,labels=0.25,teacher={teacher_dir},"
                                   "unlabelled=true"), data_dir)
  cfg.batch_size = 64
  task = tasks.build_task(cfg)
  it = task.train_batches(64, seed=0)
  batches = [next(it) for _ in range(6)]
  it.close()
  labelled = np.concatenate([b["labelled"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert 0.1 < labelled.mean() < 0.4  # a quarter of the 1438 images carry labels
  np.testing.assert_array_equal(labels < 0, labelled == 0)

  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  params = jax.jit(lambda: nn.meta.unbox(task.init(jax.random.PRNGKey(0))))()
  head = params["vit"]["head"]  # zero at init: give the logits something to say
  params["vit"]["head"] = {**head, "kernel": jax.random.normal(jax.random.PRNGKey(2),
                                                               head["kernel"].shape)}
  loss = jax.jit(lambda b: task.loss(params, b, jax.random.PRNGKey(1))[1]["cls_loss"])
  guessed = jnp.where(batch["labelled"] > 0, batch["label"], 3)  # labels the step never had
  assert float(loss(batch)) == pytest.approx(float(loss({**batch, "label": guessed})), abs=1e-7)
  only_labelled = {**batch, "label": jnp.where(batch["labelled"] > 0, 3, batch["label"])}
  assert float(loss(only_labelled)) != pytest.approx(float(loss(batch)), abs=1e-4)

  cfg.total_steps = cfg.checkpoint_every = cfg.eval_every = 2
  out = loop.train(cfg, str(tmp_path / "student_unlabelled"))
  assert np.isfinite(out["train/loss"]) and "eval/top1_dist" in out

  with pytest.raises(ValueError, match="label_fraction < 1"):
    tasks.build_task(tiny(vit_digits.get_config(f"teacher={teacher_dir},unlabelled=true"),
                          data_dir))
