"""mmjax.visualize: the arrays behind the pictures, the sown attention weights, and
the PNGs written for a tiny CLIP workdir."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import init_params, tiny_clip_config
from mmjax import visualize
from mmjax.models import layers, vit


# -- patch-embedding filters ---------------------------------------------------

def test_components_shape_orthonormal_and_ordered():
  rng = np.random.default_rng(0)
  patch, d = 4, 64
  # Filters that vary mostly along two known directions, plus a little noise.
  basis = np.linalg.qr(rng.normal(size=(patch * patch * 3, 2)))[0]  # [48, 2]
  coef = rng.normal(size=(d, 2)) * np.array([5.0, 2.0])
  kernel = (coef @ basis.T + 0.01 * rng.normal(size=(d, patch * patch * 3))).T  # [48, D]
  comps = visualize.patch_embedding_components(kernel, patch, 3)
  assert comps.shape == (28, patch, patch, 3)
  flat = comps.reshape(28, -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(28), atol=1e-5)
  # The leading two components are the two directions, in order of variance.
  assert abs(flat[0] @ basis[:, 0]) > 0.99
  assert abs(flat[1] @ basis[:, 1]) > 0.99


def test_components_follow_patchify_order_and_cap_k():
  # One filter that is red in the top-left pixel only: a [P*P*C] row index 0.
  patch = 2
  kernel = np.zeros((patch * patch * 3, 5))
  kernel[0, 0] = 1.0  # (py=0, px=0, c=0)
  comps = visualize.patch_embedding_components(kernel, patch, 3, k=28)
  assert comps.shape == (5, patch, patch, 3)  # at most D components
  assert np.argmax(np.abs(comps[0])) == np.ravel_multi_index((0, 0, 0), (patch, patch, 3))
  assert comps[0, 0, 0, 0] > 0  # signed: largest entry positive
  with pytest.raises(ValueError, match=r"patch_embed kernel has shape \(12, 5\)"):
    visualize.patch_embedding_components(kernel, 4, 3)


# -- position embeddings ---------------------------------------------------------

def test_position_similarity_shape_diagonal_and_prefix_skipped():
  gh, gw, d = 3, 5, 16
  pos = np.random.default_rng(1).normal(size=(1 + gh * gw, d))
  sim = visualize.position_similarity(pos, (gh, gw), num_prefix=1)
  assert sim.shape == (gh, gw, gh, gw)
  flat = sim.reshape(gh * gw, gh * gw)
  np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-6)
  np.testing.assert_allclose(flat, flat.T, atol=1e-6)
  assert np.all(flat <= 1 + 1e-6) and np.all(flat >= -1 - 1e-6)
  pos2 = pos.copy()
  pos2[0] = 100.0  # the class token's row does not enter
  np.testing.assert_array_equal(visualize.position_similarity(pos2, (gh, gw)), sim)
  # Row-major layout: out[i, j] is the map of grid position i * gw + j.
  e = pos[1:] / np.linalg.norm(pos[1:], axis=-1, keepdims=True)
  np.testing.assert_allclose(sim[1, 3].ravel(), e @ e[1 * gw + 3], atol=1e-6)
  with pytest.raises(ValueError, match="3x5 grid"):
    visualize.position_similarity(pos[1:], (gh, gw), num_prefix=1)


def test_row_column_similarity_tells_rows_from_columns():
  gh, gw = 4, 5
  rows = np.eye(gh)[np.repeat(np.arange(gh), gw)]  # [gh*gw, gh]: one-hot row
  cols = np.eye(gw)[np.tile(np.arange(gw), gh)]
  only_rows = visualize.row_column_similarity(visualize.position_similarity(rows, (gh, gw), 0))
  assert only_rows == pytest.approx({"row": 1.0, "column": 0.0, "other": 0.0})
  both = visualize.row_column_similarity(
      visualize.position_similarity(np.concatenate([rows, cols], -1), (gh, gw), 0))
  assert both == pytest.approx({"row": 0.5, "column": 0.5, "other": 0.0})


def test_sinusoidal_embeddings_peak_at_their_own_patch():
  g, d = 6, 64
  ij = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(-1, 2)
  freqs = 1.0 / 10 ** (np.arange(d // 4) / (d // 4))
  parts = [f(ij[:, a:a + 1] * freqs) for a in (0, 1) for f in (np.sin, np.cos)]
  sim = visualize.position_similarity(np.concatenate(parts, -1), g, num_prefix=0)
  for i in range(g):
    for j in range(g):
      assert np.unravel_index(np.argmax(sim[i, j]), (g, g)) == (i, j)


# -- attention rollout -----------------------------------------------------------

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_rollout_rows_sum_to_one_and_order_of_layers():
  rng = np.random.default_rng(2)
  attn = _softmax(rng.normal(size=(3, 2, 4, 10, 10)) * 3)  # [L, B, H, N, N]
  roll = visualize.rollout_matrix(attn)
  assert roll.shape == (2, 10, 10)
  np.testing.assert_allclose(roll.sum(-1), 1.0, atol=1e-5)
  a = attn.mean(2) + np.eye(10)
  a /= a.sum(-1, keepdims=True)
  np.testing.assert_allclose(roll, a[2] @ a[1] @ a[0], atol=1e-5)  # A_L ... A_1
  out = visualize.attention_rollout(attn, (3, 3), num_prefix=1)
  assert out.shape == (2, 3, 3)
  np.testing.assert_allclose(out.reshape(2, 9), roll[:, 0, 1:], atol=1e-6)


def test_rollout_identity_uniform_and_one_hot():
  n = 5  # class token + a 2x2 grid
  eye = np.broadcast_to(np.eye(n), (2, 1, 3, n, n))
  np.testing.assert_array_equal(visualize.rollout_matrix(eye), np.broadcast_to(np.eye(n),
                                                                                (1, n, n)))
  np.testing.assert_array_equal(visualize.attention_rollout(eye, 2), np.zeros((1, 2, 2)))
  # Uniform attention U: ((U + I) / 2)^2 = (3U + I) / 4, the same share 3 / (4n) per patch.
  uniform = np.full((2, 1, 3, n, n), 1.0 / n)
  np.testing.assert_allclose(visualize.attention_rollout(uniform, 2),
                             np.full((1, 2, 2), 3 / (4 * n)), atol=1e-6)
  # One layer where every token attends only to patch (1, 0): half stays, half flows there.
  hot = np.zeros((1, 1, 1, n, n))
  hot[..., 1 + 2] = 1.0
  want = np.zeros((1, 2, 2))
  want[0, 1, 0] = 0.5
  np.testing.assert_allclose(visualize.attention_rollout(hot, 2), want, atol=1e-6)
  # Without a class token: the mean of all rows.
  no_prefix = np.zeros((1, 1, 1, 4, 4))
  no_prefix[..., 0] = 1.0
  np.testing.assert_allclose(visualize.attention_rollout(no_prefix, 2, num_prefix=0).sum(), 1.0,
                             atol=1e-6)
  with pytest.raises(ValueError, match="5 tokens"):
    visualize.attention_rollout(eye, 3)


# -- sown attention weights ------------------------------------------------------

def test_attention_weights_are_those_of_dot_product_attention():
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (2, 6, 4, 8))
  k = jax.random.normal(kk, (2, 6, 2, 8))  # GQA: 2 kv heads for 4 query heads
  v = jax.random.normal(kv, (2, 6, 2, 8))
  mask = layers.make_attention_mask(6, 6, causal=True)
  w = layers.attention_weights(q, k, mask)
  assert w.shape == (2, 4, 6, 6)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert float(jnp.abs(jnp.triu(w, 1)).max()) == 0.0
  want = jax.nn.dot_product_attention(q, k, v, mask=mask)
  got = jnp.einsum("bnts,bsnh->btnh", w, jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_vit_sows_stacked_attention_without_changing_outputs():
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  cfg = vit.ViTConfig(variant="tiny/8", image_size=32)
  params = init_params(vit.ViT(cfg), x)
  want, _ = vit.ViT(cfg).apply({"params": params}, x)
  (got, _), state = vit.ViT(cfg, sow_attention=True).apply({"params": params}, x,
                                                             mutable=["intermediates"])
  np.testing.assert_array_equal(got, want)
  w = vit.stacked_attention(state["intermediates"], 2)
  assert w.shape == (2, 2, 2, 17, 17)  # [L, B, heads, N, N]
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  unrolled = vit.ViTConfig(variant="tiny/8", image_size=32, scan=False)
  _, state = vit.ViT(unrolled, sow_attention=True).apply(
      {"params": layers.unstack_layers(params, 2)}, x, mutable=["intermediates"])
  np.testing.assert_allclose(vit.stacked_attention(state["intermediates"], 2), w, atol=1e-6)
  with pytest.raises(ValueError, match="sow_attention=True"):
    vit.stacked_attention({}, 2)


def test_find_vit_params_skips_the_text_tower():
  from mmjax.models import clip as clip_lib
  cfg = tiny_clip_config()
  params = jax.eval_shape(lambda: nn.unbox(clip_lib.CLIP(cfg).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)))["params"])
  assert visualize.find_vit_params(params) == ("vision",)
  with pytest.raises(ValueError, match=r"found \[\]"):
    visualize.find_vit_params({"text": params["text"]})
  # A distillation run: the frozen teacher's ViT is not the one to draw.
  both = {"vit": params["vision"], "teacher": {"vit": params["vision"]}}
  with pytest.raises(ValueError, match="found"):
    visualize.find_vit_params(both)
  assert visualize.find_vit_params(both, frozen=("teacher/.*",)) == ("vit",)


# -- the CLI on a tiny workdir -----------------------------------------------------

def _save_random(config, workdir: str) -> str:
  """A workdir as `mmjax.convert` writes one: config.json and random params at step 0."""
  from mmjax.convert import workdir as workdir_lib
  from mmjax.train import tasks
  task = tasks.build_task(config)
  workdir_lib.save(workdir, config, nn.unbox(jax.jit(task.init)(jax.random.key(0))))
  return workdir


def _tiny_clip_workdir(root, stem: str) -> str:
  from experiments import clip_shapes
  c = clip_shapes.get_config("runlocal=true")
  c.model.vision.variant, c.model.text.size, c.model.embed_dim = "tiny/8", "tiny", 16
  c.model.vision.stem = stem
  c.data.data_dir = str(root / "tfds")
  c.data.builder_kwargs.num_train, c.data.builder_kwargs.num_validation = 16, 16
  c.data.builder_kwargs.num_test = 16
  workdir = str(root / f"clip_{stem}")
  return workdir if os.path.exists(workdir) else _save_random(c, workdir)  # one per module


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  return tmp_path_factory.mktemp("vis")


def _assert_pngs(written, names):
  assert sorted(written) == sorted(names)
  for path in written.values():
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_cli_writes_the_pictures_of_a_clip_workdir(tiny_root, tmp_path, capsys):
  workdir = _tiny_clip_workdir(tiny_root, "linear")
  written = visualize.visualize(workdir, num_images=3)
  _assert_pngs(written, ["patch_embedding_pca", "position_similarity", "attention_rollout",
                         "zeroshot"])
  assert all(os.path.dirname(p) == os.path.join(workdir, "pictures") for p in written.values())
  # Images of the user's own: no eval data, no true class.
  path = str(tmp_path / "mine.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(path)
  written = visualize.visualize(workdir, str(tmp_path / "out"), image_paths=[path])
  assert os.path.exists(written["zeroshot"]) and os.path.exists(written["attention_rollout"])
  with pytest.raises(FileNotFoundError, match="nope.png"):
    visualize.visualize(workdir, str(tmp_path / "out"), image_paths=["nope.png"])


def test_cli_on_a_supervised_conv_stem_vit_workdir(tiny_root, tmp_path, capsys):
  from experiments import vit_digits
  c = vit_digits.get_config("runlocal=true,variant=tiny,stem=conv")
  c.data.data_dir = str(tiny_root / "tfds")
  workdir = _save_random(c, str(tiny_root / "vit"))
  written = visualize.visualize(workdir, str(tmp_path), num_images=2)
  # No CLIP, no zero-shot panels; a conv stem has no patch filters to decompose.
  _assert_pngs(written, ["position_similarity", "attention_rollout"])
  patch = c.model.vision.variant.split("/")[1]
  assert f"'conv' stem has no {patch}x{patch} patch filters" in capsys.readouterr().out


def test_learned_filters_are_the_kernel_minus_the_loops_initialisation(tiny_root, tmp_path):
  import optax

  from mmjax.convert import workdir as workdir_lib
  from mmjax.train import step as step_lib
  loaded = visualize.load(_tiny_clip_workdir(tiny_root, "linear"))
  # initial_vit_params is what mmjax.train starts from for config.seed.
  state = jax.jit(lambda: step_lib.init_state(loaded.task, optax.adamw(1e-3),
                                              loaded.config.seed))()
  start = state.params
  for key in loaded.vit_path:
    start = start[key]
  chex.assert_trees_all_equal(visualize.initial_vit_params(loaded), start)

  # A "trained" run: that init plus a rank-1 change of the patch filters.
  params = jax.tree.map(np.asarray, state.params)
  vit_params = params
  for key in loaded.vit_path:
    vit_params = vit_params[key]
  kernel = vit_params["patch_embed"]["kernel"]
  pattern = np.linspace(-1.0, 1.0, kernel.shape[0], dtype=np.float32)
  vit_params["patch_embed"]["kernel"] = kernel + 0.5 * pattern[:, None] * np.sign(
      np.random.default_rng(0).normal(size=kernel.shape[1])).astype(np.float32)[None, :]
  workdir = str(tmp_path / "trained")
  workdir_lib.save(workdir, loaded.config, params)
  assert "patch_embedding_pca_learned" not in visualize.visualize(workdir, num_images=2)
  open(os.path.join(workdir, "metrics.jsonl"), "w").close()  # trained here
  written = visualize.visualize(workdir, num_images=2)
  _assert_pngs(written, ["patch_embedding_pca", "patch_embedding_pca_learned",
                         "position_similarity", "attention_rollout", "zeroshot"])
  learned = visualize.patch_embedding_components(
      vit_params["patch_embed"]["kernel"] - np.asarray(start["patch_embed"]["kernel"]),
      int(np.sqrt(kernel.shape[0] // 3)), 3)
  # PC 1 of the learned part is the change's direction (its sign is a convention).
  cosine = abs(learned[0].reshape(-1) @ pattern) / np.linalg.norm(pattern)
  assert cosine == pytest.approx(1.0, abs=1e-5)
