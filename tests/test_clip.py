"""The two-tower CLIP model: embeddings, temperature, SigLIP bias, sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from conftest import init_params, tiny_clip_config
from mmjax.models.clip import CLIP, CLIPConfig
from mmjax.models.text import TextConfig
from mmjax.models.vit import ViTConfig


def _batch(b=4):
  images = jax.random.normal(jax.random.key(0), (b, 32, 32, 3))
  ids = jax.random.randint(jax.random.key(1), (b, 16), 3, 64).at[:, 9].set(2)
  return images, ids


def test_embeddings_are_normalised_and_scale_starts_at_1_over_0_07():
  model = CLIP(tiny_clip_config())
  params = init_params(model, *_batch())
  out = jax.jit(model.apply)({"params": params}, *_batch())
  assert out["image_embeds"].shape == (4, 16) and out["text_embeds"].shape == (4, 16)
  np.testing.assert_allclose(jnp.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(params["log_scale"], math.log(1 / 0.07), rtol=1e-6)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  assert "logit_bias" not in out


def test_logit_scale_is_clamped_at_100():
  model = CLIP(tiny_clip_config())
  params = init_params(model, *_batch())
  params["log_scale"] = jnp.array(7.0)
  out = jax.jit(model.apply)({"params": params}, *_batch())
  np.testing.assert_allclose(out["logit_scale"], 100.0, rtol=1e-5)


def test_siglip_has_a_bias_and_starts_at_scale_10():
  model = CLIP(tiny_clip_config(loss="sigmoid"))
  params = init_params(model, *_batch())
  out = jax.jit(model.apply)({"params": params}, *_batch())
  np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
  np.testing.assert_allclose(out["logit_bias"], -10.0)


def test_towers_can_be_called_alone():
  model = CLIP(tiny_clip_config())
  images, ids = _batch()
  params = {"params": init_params(model, images, ids)}
  both = jax.jit(model.apply)(params, images, ids)
  img = jax.jit(lambda p, x: model.apply(p, x, method=CLIP.encode_image))(params, images)
  txt = jax.jit(lambda p, t: model.apply(p, t, method=CLIP.encode_text))(params, ids)
  np.testing.assert_allclose(img, both["image_embeds"], rtol=1e-6)
  np.testing.assert_allclose(txt, both["text_embeds"], rtol=1e-6)


def test_clip_b16_param_count_matches_open_clip():
  """open_clip's ViT-B-16 has 149.62M params (vision 86.19M, text 63.43M incl. projections)."""
  cfg = CLIPConfig(vision=ViTConfig(variant="B/16", image_size=224, pre_norm=True),
                   text=TextConfig(size="B"), embed_dim=512)
  shapes = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert abs(n - 149.62e6) < 0.05e6, n


def test_flop_counts_match_the_open_clip_profile():
  """REFERENCE: B/16 image 35.1 GFLOPs, L/14 image 162.0; text towers B 5.96, L 13.3."""
  from mmjax.models import text, vit
  b16 = vit.forward_flops(ViTConfig(variant="B/16", image_size=224))
  l14 = vit.forward_flops(ViTConfig(variant="L/14", image_size=224))
  assert abs(b16 / 1e9 - 35.1) < 0.2, b16
  assert abs(l14 / 1e9 - 162.0) < 0.5, l14
  assert abs(text.forward_flops(TextConfig(size="B")) / 1e9 - 5.96) < 0.05
  assert abs(text.forward_flops(TextConfig(size="L")) / 1e9 - 13.3) < 0.1


def test_unrolled_towers_run_the_last_block_at_the_pooled_token_only():
  """Unrolled, encode_image / encode_text run the last block at the class / EOS
  token alone: same embeddings as the full towers, fewer FLOPs counted."""
  from mmjax.models import clip as clip_lib
  from mmjax.models.text import TextTransformer
  from mmjax.models.vit import ViT
  cfg = tiny_clip_config(vision=ViTConfig(variant="tiny/8", image_size=32, pre_norm=True,
                                          norm_eps=1e-5, scan=False),
                         text=TextConfig(size="tiny", vocab_size=64, context_length=16,
                                         eos_id=2, scan=False))
  model = CLIP(cfg)
  images, ids = _batch()
  ids = ids.at[1, 9].set(5).at[1, 4].set(2)  # EOS at 4 in row 1
  params = init_params(model, images, ids)
  out = jax.jit(model.apply)({"params": params}, images, ids)
  pooled_img, vis = ViT(cfg.vision).apply({"params": params["vision"]}, images)
  pooled_txt, txt = TextTransformer(cfg.text).apply({"params": params["text"]}, ids)
  assert vis["tokens"].shape[1] == 17 and txt["tokens"].shape[1] == 16
  want_img = clip_lib.l2_normalize(pooled_img @ params["image_proj"]["kernel"])
  want_txt = clip_lib.l2_normalize(pooled_txt @ params["text_proj"]["kernel"])
  np.testing.assert_allclose(out["image_embeds"], want_img, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["text_embeds"], want_txt, rtol=1e-5, atol=1e-6)
  _, vis_one = ViT(cfg.vision).apply({"params": params["vision"]}, images, pooled_only=True)
  assert "tokens" not in vis_one
  scanned = tiny_clip_config()
  assert clip_lib.forward_flops(cfg) < clip_lib.forward_flops(scanned)
