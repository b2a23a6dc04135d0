"""HF CLIPModel <-> mmjax: numerical parity against transformers' PyTorch classes
(tiny configs, random weights, no download), exact round trips, and the errors.

The helpers here (tiny tokenizer, HF folders, PNGs) are shared by the other
convert tests.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax import convert
from mmjax.convert import clip as clip_conv, hf_io, workdir as workdir_lib
from mmjax.convert.mapping import ConversionError
from mmjax.data import transforms
from mmjax.data.tokenizer import load_tokenizer
from mmjax.models import clip as clip_lib
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TEXTS = ["a photo of a cat", "dog!", "a dog", "the  CAT sat on a photo of a dog"]
# 45 x 67: resizing the shorter side to 32 gives 47.6 -> 47 (truncated, as HF), not 48.
IMAGE_SIZES = [(67, 45), (45, 67), (40, 40), (100, 31)]


# -- helpers -------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def tiny_clip_tokenizer(directory: str):
  """A CLIP BPE tokenizer laid out like OpenAI's (bytes, bytes</w>, merges,
  then <|startoftext|> and <|endoftext|> last), saved to `directory`."""
  chars = _bytes_to_unicode()
  merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"),
            ("o", "t"), ("ph", "ot"), ("phot", "o</w>"), ("o", "f</w>"), ("t", "h")]
  vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
  tok.save_pretrained(directory)
  return tok


def write_pngs(directory: str, sizes=IMAGE_SIZES, seed: int = 0) -> list[str]:
  """Random RGB PNGs of the given (width, height) sizes, smooth enough that the
  bicubic resize is not all ringing."""
  rng = np.random.default_rng(seed)
  paths = []
  for i, (w, h) in enumerate(sizes):
    small = rng.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-20, 21, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img, np.int32) + noise, 0, 255).astype(np.uint8))
    path = os.path.join(directory, f"img{i}.png")
    img.save(path)
    paths.append(path)
  return paths


def randomize_(model, scale: float = 0.1, seed: int = 0):
  """Perturbs every weight, so that norms are not exactly 1 / 0 and a layout
  mistake cannot hide behind a symmetric init."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
  return model


def hf_clip_config(tok, act: str, **text_overrides):
  text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, hidden_act=act,
              layer_norm_eps=1e-5)
  text.update(text_overrides)
  vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-6)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def make_hf_clip(directory: str, act: str = "quick_gelu", dtype=None, max_shard_size=None,
                 **text_overrides):
  """A random tiny CLIPModel saved with its tokenizer and (PIL) image processor."""
  os.makedirs(directory, exist_ok=True)
  tok = tiny_clip_tokenizer(directory)
  torch.manual_seed(0)
  model = randomize_(transformers.CLIPModel(hf_clip_config(tok, act, **text_overrides)).eval())
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size
                                      else {}))
  image_processor(32).save_pretrained(directory)
  return model, tok


def image_processor(size: int, **kwargs):
  # The default CLIPImageProcessor needs torchvision in transformers 5; its PIL
  # backend is the reference implementation of the same steps.
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  return CLIPImageProcessorPil(size={"shortest_edge": size},
                               crop_size={"height": size, "width": size}, **kwargs)


def load_tensors(directory: str) -> dict[str, np.ndarray]:
  with hf_io.SafetensorsReader(directory) as r:
    return {k: r.get(k) for k in r.keys()}


def assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
  return write_pngs(str(tmp_path_factory.mktemp("pngs")))


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def converted(request, tmp_path_factory):
  """(HF model, HF tokenizer, HF folder, our workdir) per activation."""
  root = tmp_path_factory.mktemp(f"clip_{request.param}")
  src, out = str(root / "hf"), str(root / "wd")
  model, tok = make_hf_clip(src, request.param)
  convert.import_hf(src, out)
  return model, tok, src, out


# -- parity --------------------------------------------------------------------

def test_clip_parity_with_transformers(converted, pngs):
  hf, tok, src, out = converted
  config, _, cfg, params = convert.load_params(out)
  assert config.model.vision.act == hf.config.vision_config.hidden_act
  model = clip_lib.CLIP(cfg)

  # Both preprocessing paths from the same PNG files.
  ours_px = np.stack([transforms.preprocess_image(p, 32, config.data.transforms.normalize)
                      for p in pngs])
  hf_px = image_processor(32)(images=[Image.open(p) for p in pngs],
                              return_tensors="np")["pixel_values"]
  assert maxdiff(ours_px, hf_px.transpose(0, 2, 3, 1)) < 1e-5

  tokenizer = load_tokenizer(config.data.tokenizer)
  ids = tokenizer.encode_batch(TEXTS, config.data.context_length)
  hf_ids = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, hf_ids["input_ids"])

  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(hf_ids["input_ids"]),
             attention_mask=torch.tensor(hf_ids["attention_mask"]),
             pixel_values=torch.tensor(hf_px), output_hidden_states=True)
    pooled = hf.vision_model(pixel_values=torch.tensor(hf_px)).pooler_output
  out_ = jax.jit(model.apply)({"params": params}, jnp.asarray(ours_px), jnp.asarray(ids))
  _, vis = jax.jit(ViT(cfg.vision, collect_hidden=True).apply)({"params": params["vision"]},
                                                                jnp.asarray(ours_px))
  # With HF's padding mask, the padded positions' states match too.
  _, txt = jax.jit(TextTransformer(cfg.text).apply)(
      {"params": params["text"]}, jnp.asarray(ids), jnp.asarray(hf_ids["attention_mask"], bool))

  diffs = {
      "image_embeds": maxdiff(out_["image_embeds"], ref.image_embeds),
      "text_embeds": maxdiff(out_["text_embeds"], ref.text_embeds),
      "logits_per_image": maxdiff(out_["logit_scale"] * out_["image_embeds"]
                                  @ out_["text_embeds"].T, ref.logits_per_image),
      "text_last_hidden": maxdiff(txt["tokens"], ref.text_model_output.last_hidden_state),
      "vision_hidden_states": maxdiff(vis["hidden_states"], np.stack(
          [h.numpy() for h in ref.vision_model_output.hidden_states])),
      "vision_pooled": maxdiff(vis["pre_logits"], pooled),
  }
  print("max abs diffs:", diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_legacy_eos_token_id_2_pools_at_argmax(tmp_path):
  src, out = str(tmp_path / "hf"), str(tmp_path / "wd")
  hf, _ = make_hf_clip(src, "quick_gelu", eos_token_id=2)
  config = convert.import_hf(src, out)
  assert config.model.text.pool == "argmax"
  _, _, cfg, params = convert.load_params(out)
  # Ids without any EOS: the pooled position is the largest id's.
  ids = np.random.default_rng(1).integers(3, 500, (3, 16)).astype(np.int64)
  with torch.no_grad():
    ref = hf.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
  ours = jax.jit(lambda p, t: clip_lib.CLIP(cfg).apply({"params": p}, t,
                                                       method=clip_lib.CLIP.encode_text))(
      params, jnp.asarray(ids, jnp.int32))
  ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
  assert maxdiff(ours, ref) <= TOL


# -- round trips -----------------------------------------------------------------

def test_round_trip_reproduces_every_tensor(converted, tmp_path):
  _, _, src, out = converted
  back = str(tmp_path / "back")
  convert.export_hf(out, back)
  assert_same_tensors(load_tensors(src), load_tensors(back))
  for name in ("tokenizer.json", "preprocessor_config.json"):
    assert os.path.exists(os.path.join(back, name))
  reloaded = transformers.CLIPModel.from_pretrained(back)
  want = transformers.CLIPConfig.from_pretrained(src)
  for sub in ("text_config", "vision_config"):
    a, b = getattr(reloaded.config, sub).to_dict(), getattr(want, sub).to_dict()
    for key in ("hidden_act", "layer_norm_eps", "eos_token_id", "hidden_size",
                "intermediate_size", "num_attention_heads", "num_hidden_layers"):
      assert a.get(key) == b.get(key), (sub, key)


def test_round_trip_bfloat16_sharded(tmp_path):
  """A bf16 checkpoint in several shards comes back as the same bf16 tensors."""
  src, out, back = str(tmp_path / "hf"), str(tmp_path / "wd"), str(tmp_path / "back")
  make_hf_clip(src, "gelu", dtype=torch.bfloat16, max_shard_size="40KB")
  assert os.path.exists(os.path.join(src, hf_io.INDEX_NAME))
  config = convert.import_hf(src, out)
  assert config.source.dtype == "bfloat16"
  convert.export_hf(out, back, max_shard_bytes=50_000)
  assert os.path.exists(os.path.join(back, hf_io.INDEX_NAME))
  assert_same_tensors(load_tensors(src), load_tensors(back))
  transformers.CLIPModel.from_pretrained(back)


def test_export_of_a_model_trained_here(tmp_path, pngs):
  """Random mmjax params (a non-zero patch bias included) served by transformers."""
  src = str(tmp_path / "hf")
  make_hf_clip(src, "quick_gelu")
  out, back = str(tmp_path / "wd"), str(tmp_path / "back")
  config = convert.import_hf(src, out)
  cfg = clip_conv.model_config(config)
  model = clip_lib.CLIP(cfg)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: (0.2 * rng.normal(size=a.shape)).astype(a.dtype),
                        convert.abstract_params(model, clip_conv.init_args(cfg)))
  params["log_scale"] = np.float32(np.log(20.0))
  assert np.any(params["vision"]["patch_embed"]["bias"])
  trained = str(tmp_path / "trained")
  workdir_lib.save(trained, config, params)
  convert.export_hf(trained, back)
  hf = transformers.CLIPModel.from_pretrained(back).eval()
  px = np.stack([transforms.preprocess_image(p, 32) for p in pngs])
  ids = load_tokenizer(config.data.tokenizer).encode_batch(TEXTS, 16)
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(px), jnp.asarray(ids))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)))
  assert maxdiff(ours["image_embeds"], ref.image_embeds) <= TOL
  assert maxdiff(ours["text_embeds"], ref.text_embeds) <= TOL


# -- errors ----------------------------------------------------------------------

def _edit_config(directory: str, fn):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  fn(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("clip_err") / "hf")
  make_hf_clip(src)
  return src


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["vision_config"].update(hidden_act="gelu_10"), "vision_config.hidden_act"),
    (lambda c: c["text_config"].update(hidden_act="mish"), "text_config.hidden_act"),
    (lambda c: c["vision_config"].update(num_channels=1), "vision_config.num_channels"),
    (lambda c: c.update(architectures=["CLIPSegForImageSegmentation"], model_type="clipseg"),
     "architectures"),
])
def test_unsupported_config_fields_are_named(hf_dir, tmp_path, edit, field):
  import shutil
  src = str(tmp_path / "hf")
  shutil.copytree(hf_dir, src)
  _edit_config(src, edit)
  with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
    convert.import_hf(src, str(tmp_path / "wd"))


def test_unsupported_preprocessing_is_named(hf_dir, tmp_path):
  import shutil
  src = str(tmp_path / "hf")
  shutil.copytree(hf_dir, src)
  image_processor(32, resample=2).save_pretrained(src)
  with pytest.raises(ConversionError, match="resample"):
    convert.import_hf(src, str(tmp_path / "wd"))


def test_unknown_tensors_are_an_error(hf_dir, tmp_path):
  import shutil
  from safetensors.numpy import save_file
  src = str(tmp_path / "hf")
  shutil.copytree(hf_dir, src)
  tensors = load_tensors(src)
  tensors["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
  tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]  # old files: ignored
  save_file(tensors, os.path.join(src, "model.safetensors"))
  with pytest.raises(ConversionError, match="extra_head"):
    convert.import_hf(src, str(tmp_path / "wd"))


def test_workdir_holds_what_mmjax_needs(converted):
  _, tok, _, out = converted
  config = workdir_lib.load_config(out)
  assert config.task == "clip" and config.data.image_size == 32
  assert config.model.text.eos_id == tok.eos_token_id
  assert os.path.exists(config.data.tokenizer)
  assert os.path.exists(os.path.join(out, workdir_lib.HF_CONFIG_NAME))
  # mmjax.train's CLIPTask builds the same model from it (the pad id is the tokenizer's).
  from mmjax.train import tasks
  task = tasks.build_task(config)
  want = clip_conv.model_config(config)
  assert task.model_config.vision == want.vision
  assert dataclasses.replace(task.model_config.text, pad_id=want.text.pad_id) == want.text
  assert want.text.dims == (32, 2, 4) and want.text.hidden_dim == 37
  assert want.vision.size == dict(width=48, depth=3, mlp_dim=64, num_heads=4, patch_size=8)
