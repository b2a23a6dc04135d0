"""HF LlavaForConditionalGeneration <-> mmjax LLaVA: parity for both projector
types at vision feature layer -2 (images through both pad-to-square
preprocessing paths), exact round trips, the legacy key layout, and errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax import convert
from mmjax.convert import workdir as workdir_lib
from mmjax.convert.mapping import ConversionError
from mmjax.data import transforms
from mmjax.models import llava as llava_lib

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert_clip import (TOL, assert_same_tensors, load_tensors, maxdiff,  # noqa: E402
                               randomize_, write_pngs)

IMAGE_TOKEN = 110
VARIANTS = {
    # LLaVA-1.5: mlp2x_gelu, penultimate layer, class token dropped.
    "mlp2x_gelu": dict(projector_hidden_act="gelu", vision_feature_select_strategy="default"),
    # LLaVA v1's linear projector (HF: identity act), keeping the class token.
    "linear": dict(projector_hidden_act="linear", vision_feature_select_strategy="full"),
}


def hf_llava_config(**overrides):
  vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=40,
                num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = dict(model_type="llama", vocab_size=120, hidden_size=48, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0)
  full = overrides.get("vision_feature_select_strategy") == "full"
  base = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
              vision_feature_layer=-2, image_seq_length=16 + full)
  base.update(overrides)
  return transformers.LlavaConfig(**base)


def image_processor():
  from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
  return LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                do_pad=True)


def make_hf_llava(directory: str, **overrides):
  os.makedirs(directory, exist_ok=True)
  torch.manual_seed(0)
  model = randomize_(transformers.LlavaForConditionalGeneration(
      hf_llava_config(**overrides)).eval())
  model.save_pretrained(directory)
  image_processor().save_pretrained(directory)
  return model


def expand_image_tokens(ids: np.ndarray, n: int) -> np.ndarray:
  """What HF's processor does: one `<image>` becomes n image tokens."""
  rows = []
  for row in ids:
    k = int(np.argmax(row == IMAGE_TOKEN))
    rows.append(np.concatenate([row[:k], np.full(n, IMAGE_TOKEN), row[k + 1:]]))
  return np.stack(rows)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
  return write_pngs(str(tmp_path_factory.mktemp("llava_pngs")), [(67, 45), (30, 52)])


_CONVERTED = {}


def _converted(kind, tmp_path_factory):
  if kind not in _CONVERTED:
    root = tmp_path_factory.mktemp(f"llava_{kind}")
    src, out = str(root / "hf"), str(root / "wd")
    model = make_hf_llava(src, **VARIANTS[kind])
    convert.import_hf(src, out)
    _CONVERTED[kind] = kind, model, src, out
  return _CONVERTED[kind]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
  return _converted(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mlp_converted(tmp_path_factory):
  return _converted("mlp2x_gelu", tmp_path_factory)


def _ours(cfg, params, px, ids):
  model = llava_lib.LLaVA(cfg)

  def run(m, images, ids):
    embeds, plan = m.embed_inputs(images, ids)
    logits, _, hidden = m.llm(embeddings=embeds, padding=plan["valid"], return_hidden=True)
    return logits, hidden, m.image_features(images)

  fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, method=run))
  return [np.asarray(x) for x in fn(params, jnp.asarray(px), jnp.asarray(ids))]


def test_llava_parity_with_transformers(converted, pngs):
  kind, hf, _, out = converted
  config, _, cfg, params = convert.load_params(out)
  assert cfg.projector == kind and cfg.feature_layer == -2
  assert config.data.transforms.pad_to_square
  ours_px = np.stack([transforms.preprocess_image(p, 32, pad_square=True) for p in pngs])
  hf_px = image_processor()(images=[Image.open(p) for p in pngs],
                            return_tensors="np")["pixel_values"]
  assert maxdiff(ours_px, hf_px.transpose(0, 2, 3, 1)) < 1e-5

  rng = np.random.default_rng(0)
  ids = rng.integers(3, 100, (2, 10))
  ids[0, 1], ids[1, 4] = IMAGE_TOKEN, IMAGE_TOKEN
  logits, hidden, features = _ours(cfg, params, ours_px, ids)
  hf_ids = torch.tensor(expand_image_tokens(ids, cfg.num_image_tokens))
  with torch.no_grad():
    ref = hf(input_ids=hf_ids, pixel_values=torch.tensor(hf_px))
    last = hf.model(input_ids=hf_ids, pixel_values=torch.tensor(hf_px)).last_hidden_state
    ref_features = torch.stack(hf.model.get_image_features(
        pixel_values=torch.tensor(hf_px), vision_feature_layer=-2,
        vision_feature_select_strategy=hf.config.vision_feature_select_strategy).pooler_output)
  diffs = {"image_features": maxdiff(features, ref_features),
           "logits": maxdiff(logits, ref.logits), "last_hidden": maxdiff(hidden, last)}
  print(kind, "max abs diffs:", diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_llava_round_trip_reproduces_every_tensor(converted, tmp_path):
  kind, hf, src, out = converted
  back = str(tmp_path / "back")
  convert.export_hf(out, back)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(back).eval()
  if kind == "mlp2x_gelu":
    assert_same_tensors(load_tensors(src), load_tensors(back))
  else:
    # A v1 linear projector comes back as one Linear and an identity linear_2;
    # a second round trip is then exact.
    w2 = reloaded.model.multi_modal_projector.linear_2.weight.detach().numpy()
    np.testing.assert_array_equal(w2, np.eye(48, dtype=np.float32))
    again, back2 = str(tmp_path / "again"), str(tmp_path / "back2")
    convert.import_hf(back, again)
    convert.export_hf(again, back2)
    assert_same_tensors(load_tensors(back), load_tensors(back2))
  for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_id",
              "image_seq_length"):
    assert getattr(reloaded.config, key) == getattr(hf.config, key), key
  ids = torch.tensor(expand_image_tokens(np.array([[5, IMAGE_TOKEN, 7]]),
                                         hf.config.image_seq_length))
  px = torch.randn(1, 3, 32, 32)
  with torch.no_grad():
    a = reloaded(input_ids=ids, pixel_values=px).logits
    b = hf(input_ids=ids, pixel_values=px).logits
  assert maxdiff(a, b) <= TOL


LAYOUTS = {
    # The hub's llava-hf files (transformers 4.x).
    "hub": [("vision_tower.", "vision_tower.vision_model.")],
    # transformers 5's in-memory names.
    "memory": [("language_model.model.", "model.language_model."),
               ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."),
               ("language_model.lm_head.", "lm_head.")],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_other_key_layouts_import_the_same_and_round_trip(mlp_converted, tmp_path, name):
  _, _, src, out = mlp_converted
  from safetensors.numpy import save_file
  other = str(tmp_path / "other")
  shutil.copytree(src, other)
  tensors = {}
  for k, v in load_tensors(src).items():  # transformers 5 saves "language_model.model.*"
    for old, new in LAYOUTS[name]:
      if k.startswith(old):
        k = new + k[len(old):]
        break
    tensors[k] = v
  save_file(tensors, os.path.join(other, "model.safetensors"))
  wd, back = str(tmp_path / "wd"), str(tmp_path / "back")
  convert.import_hf(other, wd)
  a, b = convert.load_params(out)[3], convert.load_params(wd)[3]
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  convert.export_hf(wd, back)
  assert_same_tensors(tensors, load_tensors(back))
  if name == "hub":
    transformers.LlavaForConditionalGeneration.from_pretrained(back)


def test_llava_task_builds_from_a_converted_workdir(tmp_path):
  from mmjax.data.tokenizer import IMAGE_TOKEN as IMAGE_TEXT, train_sentencepiece
  from mmjax.train import tasks
  src = str(tmp_path / "hf")
  tok = train_sentencepiece(["what color is the circle", "a red circle"] * 20, 100)
  make_hf_llava(src, image_token_index=tok.piece_to_id(IMAGE_TEXT), **VARIANTS["mlp2x_gelu"])
  tok.save(os.path.join(src, "tokenizer.model"))
  config = convert.import_hf(src, str(tmp_path / "wd"))
  assert config.task == "llava" and config.stage == 2
  task = tasks.build_task(workdir_lib.load_config(str(tmp_path / "wd")))
  want = convert.family_for_task("llava").model_config(config)
  assert task.model_config.vision == want.vision and task.model_config.llm == want.llm
  assert task.model_config.image_token_id == want.image_token_id == 4
  # mmjax.chat answers from it.
  from mmjax import chat
  png = write_pngs(str(tmp_path), [(40, 30)])[0]
  answer = chat.answer_once(str(tmp_path / "wd"), png, "What color is the circle?",
                            max_new_tokens=3)
  assert isinstance(answer, str)


def _edit(src, tmp_path, fn):
  dst = str(tmp_path / "edited")
  shutil.copytree(src, dst)
  path = os.path.join(dst, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  fn(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)
  return dst


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act"),
    (lambda c: c.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
    (lambda c: c.update(multimodal_projector_bias=False), "multimodal_projector_bias"),
    (lambda c: c["text_config"].update(model_type="mistral"), "text_config.model_type"),
    (lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
     "vision_config.model_type"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
     "text_config.rope_parameters.rope_type"),
])
def test_unsupported_llava_fields_are_named(mlp_converted, tmp_path, edit, field):
  _, _, src, _ = mlp_converted
  with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
    convert.import_hf(_edit(src, tmp_path, edit), str(tmp_path / "wd"))


@pytest.mark.parametrize("change", [{"image_posemb": True}, {"merge": 2}])
def test_export_refuses_what_transformers_cannot_hold(change):
  import dataclasses
  from mmjax.convert import llava as llava_conv
  from mmjax.models import llava as llava_lib
  vision = llava_lib.LLaVAConfig().vision
  cfg = llava_lib.LLaVAConfig(vision=dataclasses.replace(vision, image_size=56), **change)
  with pytest.raises(ConversionError, match="no transformers equivalent"):
    llava_conv.hf_config(cfg)
