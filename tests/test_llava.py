"""LLaVA: image features land exactly at the placeholder, masks and positions per
row, the projector and feature layer, frozen params, and the stages end to end
through the shared loop (with loading from earlier workdirs)."""

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import llava_shapes, lm_shapes
from mmjax import checkpoint, losses
from mmjax.models import llava as llava_lib, llm as llm_lib
from mmjax.models.vit import ViTConfig
from mmjax.train import loop, optim, step as step_lib

from conftest import init_params

IMG = 4
TINY = llava_lib.LLaVAConfig(
    vision=ViTConfig(variant="tiny/8", image_size=16, pre_norm=True, norm_eps=1e-5, pool="none"),
    llm=llm_lib.llm_config("tiny", vocab_size=40), image_token_id=IMG)
N = TINY.num_image_tokens  # 4 patches


def test_splice_puts_features_exactly_at_the_placeholder():
  ids = jnp.array([[1, 4, 10, 11, 0, 0],    # image first, right padding
                   [0, 0, 1, 12, 4, 13],    # left padding, image in the middle
                   [1, 14, 15, 16, 17, 4],  # image last
                   [1, 18, 19, 0, 0, 0]])   # no image
  valid_text = ids != 0
  plan = llava_lib.splice_plan(ids, IMG, N, valid_text)
  b, t = ids.shape
  text = jnp.broadcast_to(ids[..., None].astype(jnp.float32), (b, t, 3))
  image = jnp.broadcast_to(100 + jnp.arange(N, dtype=jnp.float32)[None, :, None], (b, N, 3))
  image = image + 1000 * jnp.arange(b)[:, None, None]
  out = np.asarray(llava_lib.splice_embeddings(text, image, plan))[..., 0]
  assert out.shape == (b, t - 1 + N)
  patch = lambda r: [1000 * r + 100 + i for i in range(N)]
  np.testing.assert_array_equal(out[0], [1, *patch(0), 10, 11, 0, 0])
  np.testing.assert_array_equal(out[1], [0, 0, 1, 12, *patch(1), 13])
  np.testing.assert_array_equal(out[2], [1, 14, 15, 16, 17, *patch(2)])
  np.testing.assert_array_equal(out[3], [1, 18, 19, 0, 0, 0, 0, 0, 0])
  valid = np.asarray(plan["valid"])
  np.testing.assert_array_equal(valid[0], [1] * 7 + [0, 0])
  np.testing.assert_array_equal(valid[1], [0, 0] + [1] * 7)
  np.testing.assert_array_equal(valid[3], [1, 1, 1] + [0] * 6)
  positions = np.asarray(llm_lib.positions_from_valid(plan["valid"]))
  np.testing.assert_array_equal(positions[1], [0, 0, 0, 1, 2, 3, 4, 5, 6])
  # Labels follow their tokens; image slots and padding are ignored.
  labels = jnp.where(ids == 0, -100, ids + 50)
  got = np.asarray(llava_lib.splice_labels(labels, plan))
  np.testing.assert_array_equal(got[0], [51, -100, -100, -100, -100, 60, 61, -100, -100])
  np.testing.assert_array_equal(got[2], [51, 64, 65, 66, 67, -100, -100, -100, -100])


def test_a_row_is_the_same_wherever_it_sits_in_the_batch():
  model = llava_lib.LLaVA(TINY)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  row = jnp.array([1, 20, 4, 21, 22])
  ids = jnp.stack([jnp.concatenate([row, jnp.zeros(3, jnp.int32)]),      # right padded
                   jnp.concatenate([jnp.zeros(3, jnp.int32), row])])     # left padded
  params = init_params(model, images, ids)
  apply = jax.jit(model.apply)
  same_image = jnp.stack([images[0], images[0]])
  logits, out = apply({"params": params}, same_image, ids)
  valid = np.asarray(out["plan"]["valid"])
  a, b = np.asarray(logits[0])[valid[0]], np.asarray(logits[1])[valid[1]]
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Beside another row with its image elsewhere, the row is unchanged.
  other = jnp.array([1, 4, 23, 24, 25, 26, 27, 28])
  mixed, out2 = apply({"params": params}, images, jnp.stack([ids[0], other]))
  np.testing.assert_allclose(np.asarray(mixed[0])[np.asarray(out2["plan"]["valid"])[0]], a,
                             rtol=1e-4, atol=1e-5)
  assert np.isfinite(np.asarray(logits)).all()


def test_next_token_logits_are_the_full_logits_before_each_text_token():
  # The training loss's logits (the head only before text tokens) against the
  # full forward's, spliced labels shifted by one: the same predictions and
  # the same loss, wherever the image sits, without one, with padding.
  model = llava_lib.LLaVA(TINY)
  ids = jnp.array([[1, 4, 10, 11, 0, 0],
                   [0, 0, 1, 12, 4, 13],
                   [1, 14, 15, 16, 17, 4],
                   [1, 18, 19, 20, 0, 0]])
  labels = jnp.where(ids == 0, -100, ids + 5).at[:, :2].set(-100)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params = init_params(model, images, ids)
  full, out = model.apply({"params": params}, images, ids)
  part, out2 = model.apply({"params": params}, images, ids,
                           method=llava_lib.LLaVA.next_token_logits)
  assert part.shape == (4, ids.shape[1] - 1, full.shape[-1])
  slots = llava_lib.text_predecessors(out["plan"], ids.shape[1], N)
  target_valid = np.asarray(out2["target_valid"])
  np.testing.assert_array_equal(target_valid, np.asarray((ids[:, 1:] != 0) & (ids[:, 1:] != IMG)))
  for r in range(4):
    for i in np.flatnonzero(target_valid[r]):
      np.testing.assert_allclose(np.asarray(part[r, i]), np.asarray(full[r, slots[r, i]]),
                                 rtol=1e-5, atol=1e-5)
  # Row 0: token 2 (10) follows the image, so the last image slot predicts it.
  assert int(slots[0, 1]) == 1 + N - 1
  spliced = llava_lib.splice_labels(labels, out["plan"])
  want, n_want = losses.next_token_loss(full[:, :-1], spliced[:, 1:])
  got, n_got = losses.next_token_loss(part, jnp.where(out2["target_valid"], labels[:, 1:], -100))
  assert int(n_got) == int(n_want) > 0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_shift_labels_pads_with_the_ignore_index():
  got = losses.shift_labels(jnp.array([[5, 6, 7], [-100, 8, 9]]))
  np.testing.assert_array_equal(got, [[6, 7, -100], [8, 9, -100]])


def test_features_are_the_projected_penultimate_layer():
  model = llava_lib.LLaVA(TINY)
  images = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
  ids = jnp.array([[1, 4, 5]])
  params = init_params(model, images, ids)
  assert set(params["projector"]) == {"linear_1", "linear_2"}
  from mmjax.models.vit import ViT

  @jax.jit
  def both(params, images):
    feats = model.apply({"params": params}, images, method=llava_lib.LLaVA.image_features)
    _, vout = ViT(TINY.vision, collect_hidden=True).apply({"params": params["vision"]}, images)
    hidden = vout["hidden_states"][-2][:, 1:]  # penultimate, class token dropped
    p = params["projector"]
    h = hidden @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
    h = jax.nn.gelu(h, approximate=False)
    return feats, h @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]

  feats, want = both(params, images)
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)
  linear = llava_lib.LLaVA(llava_lib.LLaVAConfig(**{**TINY.__dict__, "projector": "linear",
                                                    "keep_cls": True}))
  shapes = jax.eval_shape(linear.init, jax.random.key(0), images, ids)["params"]
  assert set(shapes["projector"]) == {"linear_1"}
  out = jax.eval_shape(lambda p: linear.apply({"params": p}, images,
                                              method=llava_lib.LLaVA.image_features),
                       nn.unbox(shapes))
  assert out.shape == (1, N + 1, 32)


def test_merged_tokens_and_position_embedding():
  # A 4 x 4 patch grid, 2 x 2 blocks merged: 4 image tokens of 4x the width.
  x = jnp.arange(16.0)[None, :, None] * jnp.ones((1, 1, 3))
  merged = np.asarray(llava_lib.merge_tokens(x, 2))[0, :, ::3]  # channel 0 of each patch
  np.testing.assert_array_equal(merged, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                         [10, 11, 14, 15]])
  vision = ViTConfig(variant="tiny/4", image_size=16, pre_norm=True, norm_eps=1e-5, pool="none")
  cfg = llava_lib.LLaVAConfig(vision=vision, llm=TINY.llm, image_token_id=IMG, merge=2,
                              image_posemb=True)
  assert cfg.grid == 2 and cfg.num_image_tokens == 4
  model = llava_lib.LLaVA(cfg)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = init_params(model, images, jnp.array([[1, 4, 5]] * 2))
  posemb = params["projector"]["pos_embed"]
  np.testing.assert_allclose(posemb, llava_lib.layers.sincos_2d(2, 32), rtol=1e-6)  # its init
  assert params["projector"]["linear_1"]["kernel"].shape == (4 * 32, 32)  # tiny ViT width 32
  from mmjax.models.vit import ViT
  _, vout = ViT(vision, collect_hidden=True).apply({"params": params["vision"]}, images)
  hidden = llava_lib.merge_tokens(vout["hidden_states"][-2][:, 1:], 2)
  plain = llava_lib.Projector("mlp2x_gelu", 32).apply(
      {"params": {k: params["projector"][k] for k in ("linear_1", "linear_2")}}, hidden)
  feats = model.apply({"params": params}, images, method=llava_lib.LLaVA.image_features)
  np.testing.assert_allclose(feats, plain + posemb, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="merge=3 must divide the 4 x 4"):
    _ = llava_lib.LLaVAConfig(vision=vision, merge=3).num_image_tokens


def test_sincos_2d_encodes_row_and_column():
  pe = np.asarray(llava_lib.layers.sincos_2d(3, 8))  # [9, 8]: 2 channels each
  rows, cols = np.divmod(np.arange(9), 3)
  np.testing.assert_allclose(pe[:, 0], np.sin(rows), atol=1e-6)  # lowest frequency is 1
  np.testing.assert_allclose(pe[:, 5], np.sin(cols / 100), atol=1e-6)  # 10000 ** (-1/2)
  assert len({tuple(np.round(r, 5)) for r in pe}) == 9  # every position distinct


# -- the tasks through the shared loop ------------------------------------------

TINY_ARGS = "runlocal=true,llm=tiny,num_train=48,num_eval=6,image_size=32"


def _config(module, workdir_data, **kw):
  if module is llava_shapes:
    kw["vision"] = "tiny"
  args = ",".join([TINY_ARGS, f"data={workdir_data}"] + [f"{k}={v}" for k, v in kw.items()])
  c = module.get_config(args)
  c.async_checkpoints = False
  c.total_steps = c.eval_every = c.checkpoint_every = 3
  c.log_every = 1
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """lm -> stage 1 -> stage 2, a few steps each, on 8 fake devices."""
  root = tmp_path_factory.mktemp("llava")
  data = str(root / "data")
  out = {"root": root, "data": data}
  out["lm"] = loop.train(_config(lm_shapes, data), str(root / "lm"))
  out["stage1"] = loop.train(_config(llava_shapes, data, stage=1, lm=root / "lm"),
                             str(root / "stage1"))
  out["stage2"] = loop.train(_config(llava_shapes, data, stage=2, stage1=root / "stage1"),
                             str(root / "stage2"))
  return out


def _params(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  meta = ckpt.manager.item_metadata(ckpt.latest_step())["state"]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        getattr(meta, "tree", meta)["params"])
  ckpt.close()
  return checkpoint.restore_subtree(workdir, ("params",), target)


def test_stages_run_and_log_their_metrics(runs):
  assert {"eval/loss", "eval/perplexity", "eval/grounded_accuracy",
          "eval/grounded_accuracy/existence"} <= set(runs["lm"])
  s1 = runs["stage1"]
  assert {"eval/caption_loss", "eval/caption_loss_no_image"} <= set(s1)
  # eval_at_start: the untrained projector's numbers at step 0, no train metrics.
  first = json.loads(open(runs["root"] / "stage1" / "metrics.jsonl").readline())
  assert first["step"] == 0 and "eval/caption_loss" in first and "train/loss" not in first
  s2 = runs["stage2"]
  assert "eval/vqa_accuracy" in s2 and "eval/vqa_accuracy/color" in s2
  for stage in ("lm", "stage1", "stage2"):
    rows = [json.loads(l) for l in open(runs["root"] / stage / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["train/loss"])


def test_lm_documents_are_weighted_per_file(runs):
  from mmjax.train import tasks
  config = _config(lm_shapes, runs["data"])
  count = lambda name: len(json.load(open(os.path.join(runs["data"], f"{name}.json"))))
  plain = len(tasks.build_task(config)._documents("train"))
  assert plain == count("captions") + count("instruct") + count("grounded")
  config.data.lm_weights = {"captions": 0.0, "grounded": 2.5}
  weighted = tasks.build_task(config)._documents("train")
  assert len(weighted) == count("instruct") + round(2.5 * count("grounded"))
  config.data.lm_weights = {"images": 1.0}
  with pytest.raises(ValueError, match="lm_weights"):
    tasks.build_task(config)._documents("train")


def test_greedy_exact_needs_every_answer_token():
  from mmjax.train.tasks.llava import greedy_exact
  labels = jnp.array([[-100, -100, 3, 1], [-100, -100, 3, 1]])  # the answer: 3, then 1 (EOS)
  logits = jax.nn.one_hot(jnp.array([[0, 3, 1, 0], [0, 3, 2, 0]]), 5)  # row 1: 2 after 3
  np.testing.assert_array_equal(greedy_exact(logits, labels), [True, False])


def test_each_stage_starts_from_the_previous_one(runs):
  root = runs["root"]
  lm, s1, s2 = _params(root / "lm"), _params(root / "stage1"), _params(root / "stage2")
  # Stage 1 froze the LLM it loaded: bit for bit the LM run's weights.
  chex.assert_trees_all_equal(s1["llm"], lm)
  # Stage 2 froze the tower it loaded from stage 1 and trained the rest.
  chex.assert_trees_all_equal(s2["vision"], s1["vision"])
  assert not np.allclose(s2["llm"]["norm"]["scale"], s1["llm"]["norm"]["scale"])
  assert not np.allclose(s2["projector"]["linear_2"]["kernel"],
                         s1["projector"]["linear_2"]["kernel"])


def test_stage2_step_leaves_frozen_params_and_holds_no_state_for_them(runs, tmp_path):
  config = _config(llava_shapes, runs["data"], stage=2)
  config.optim.warmup_steps = 0  # a full-size first step
  s = loop.setup(config, str(tmp_path / "unused"))
  task, tx, mask = s["task"], s["tx"], s["mask"]
  state = jax.jit(lambda: step_lib.init_state(task, tx, 0))()
  n_vision = optim.count_params(state.params["vision"])
  n_total = optim.count_params(state.params)
  assert optim.opt_state_size(state.opt_state) == 2 * (n_total - n_vision)
  batch = {k: v for k, v in next(task.train_batches(8, seed=0)).items() if k in task.batch_keys}
  new, metrics = jax.jit(step_lib.make_train_step(task, tx, mask, s["schedule"]))(state, batch)
  chex.assert_trees_all_equal(new.params["vision"], state.params["vision"])
  assert not np.allclose(new.params["llm"]["norm"]["scale"], state.params["llm"]["norm"]["scale"])
  assert np.isfinite(metrics["train/loss"])
  # Stage 1 trains the projector only.
  s1 = loop.setup(_config(llava_shapes, runs["data"], stage=1), str(tmp_path / "unused1"))
  st1 = jax.eval_shape(lambda: step_lib.init_state(s1["task"], s1["tx"], 0))
  assert optim.opt_state_size(st1.opt_state) == 2 * optim.count_params(st1.params["projector"])


def test_batches_hold_the_image_and_masked_labels(runs):
  config = _config(llava_shapes, runs["data"], stage=2)
  task = loop.setup(config, str(runs["root"] / "unused_b"))["task"]
  batch = next(task.train_batches(4, seed=0))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["tokens"].shape == batch["labels"].shape == (4, task.max_len)
  assert ((batch["tokens"] == 4).sum(1) == 1).all()  # one placeholder per row
  labelled = batch["labels"] != -100
  assert labelled.any(1).all()
  np.testing.assert_array_equal(batch["labels"][labelled], batch["tokens"][labelled])


def test_chat_answers_from_a_workdir(runs, capsys):
  from mmjax import chat
  root = runs["root"]
  image = os.path.join(runs["data"], "images", "eval", "000000.png")
  answer = chat.answer_once(str(root / "stage2"), image, "What color is the circle?",
                            max_new_tokens=4)
  assert isinstance(answer, str)


@pytest.mark.slow
def test_stage1_learns_to_use_the_image(runs):
  """After a short LM pretraining, training only the projector lowers the frozen
  LM's caption loss clearly below its loss with the untrained projector."""
  root = runs["root"]
  lm = _config(lm_shapes, runs["data"])
  lm.total_steps = lm.eval_every = lm.checkpoint_every = 150
  lm.batch_size, lm.log_every, lm.optim.lr = 16, 50, 3e-3
  loop.train(lm, str(root / "lm_long"))
  config = _config(llava_shapes, runs["data"], stage=1, lm=root / "lm_long")
  config.total_steps = config.eval_every = config.checkpoint_every = 150
  config.batch_size, config.log_every, config.optim.lr = 16, 50, 3e-3
  last = loop.train(config, str(root / "stage1_long"))
  untrained = json.loads(open(root / "stage1_long" / "metrics.jsonl").readline())
  assert untrained["step"] == 0
  assert last["eval/caption_loss"] < untrained["eval/caption_loss"] - 0.2
