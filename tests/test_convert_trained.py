"""Export what mmjax trains: a CLIP trained here on the digits loads in
transformers (CLIPModel, AutoTokenizer, AutoProcessor) from the export folder
alone, with the embeddings and zero-shot predictions of mmjax; the export
re-imports bit for bit; a model transformers cannot hold is refused before
anything is written."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_clip_config
from mmjax import convert, embed
from mmjax.convert import clip as clip_conv, hf_tokenizer, mapping
from mmjax.convert.mapping import ConversionError
from mmjax.data import builders, pipeline, shapes, tokenizer as tokenizer_lib

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _train(config, workdir):
  from mmjax.train import loop
  config.async_checkpoints = False
  loop.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """experiments/clip_digits.py, tiny, trained 3 steps and evaluated; exported."""
  from experiments import clip_digits
  root = tmp_path_factory.mktemp("digits")
  c = clip_digits.get_config("runlocal=true")
  c.model.vision.variant, c.model.text.size, c.model.embed_dim = "tiny/8", "tiny", 16
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 3, 16, 1, 3, 3
  c.eval.batch_size = 64
  c.data.data_dir = str(root / "tfds")
  workdir, out = str(root / "run"), str(root / "hf")
  rows = _train(c, workdir)
  convert.export_hf(workdir, out)
  return {"config": c, "workdir": workdir, "out": out, "root": root,
          "eval": next(r for r in reversed(rows) if "eval/zeroshot_top1" in r)}


def _pngs(directory, sizes=((32, 32), (45, 60), (80, 50), (20, 33))):
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate(sizes):
    path = os.path.join(directory, f"x{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


@pytest.mark.slow
def test_trained_export_matches_mmjax_embed(digits, tmp_path):
  """CLIPModel + AutoTokenizer + AutoProcessor from the export folder alone give
  the embeddings of `mmjax.embed` (PNGs of any size, texts of any length)."""
  out = digits["out"]
  assert "mmjax.safetensors" in os.listdir(out) and "preprocessor_config.json" in os.listdir(out)
  model = transformers.CLIPModel.from_pretrained(out).eval()
  processor = transformers.AutoProcessor.from_pretrained(out)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  paths = _pngs(str(tmp_path))
  texts = ["a photo of the digit seven.", "digit 3, 10 and 42", "  spaces  here ",
           "a rather long handwritten description of a four " * 4]
  ours = embed.embed(digits["workdir"], paths, texts)
  inputs = processor(text=texts, images=[Image.open(p) for p in paths], return_tensors="pt",
                     padding="max_length", truncation=True)
  assert np.array_equal(inputs["input_ids"].numpy(),
                        tokenizer(texts, padding="max_length", truncation=True,
                                  return_tensors="np")["input_ids"])
  with torch.no_grad():
    ref = model(**inputs)
  assert np.abs(ref.image_embeds.numpy() - ours["image_embeds"]).max() <= TOL
  assert np.abs(ref.text_embeds.numpy() - ours["text_embeds"]).max() <= TOL


@pytest.mark.slow
def test_trained_export_tokenizes_the_corpus_as_mmjax(digits):
  """Every caption and prompt of the dataset: the exported tokenizer's ids are
  mmjax's with EOS and the last id exchanged, truncated the same way."""
  config, out = digits["config"], digits["out"]
  ours_tok = pipeline.dataset_tokenizer(config.data)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  texts = [c for label in range(10) for c in builders.digit_captions(label, label, 20)]
  texts += [t.format(w) for t in builders.DIGITS_TEMPLATES for w in builders.DIGIT_WORDS]
  texts += ["ünïcode ✓", "new\nline", "", "9" * 40]
  ours = ours_tok.encode_batch(texts, config.data.context_length)
  v = ours_tok.vocab_size
  moved = np.where(ours == 2, v - 1, np.where(ours == v - 1, 2, ours))
  theirs = hf_tok(texts, padding="max_length", truncation=True,
                  max_length=config.data.context_length, return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(theirs, moved)
  assert hf_tok.decode(theirs[0], skip_special_tokens=True) == texts[0]


@pytest.mark.slow
def test_trained_export_has_the_same_zero_shot_top1(digits):
  """The digits test split through the exported processor, tokenizer and model
  (`--verify`): the zero-shot top-1 that mmjax's evaluation logged."""
  from mmjax.convert import verify
  result = verify.verify_clip(digits["workdir"], digits["out"])
  assert result["images"] == 359 and result["tokens_equal"]
  assert result["image_max_diff"] <= TOL and result["text_max_diff"] <= TOL
  slack = result["near_ties"] / result["images"] + 1e-6
  assert abs(result["top1"]["mmjax"] - digits["eval"]["eval/zeroshot_top1"]) <= 1e-6
  assert abs(result["top1"]["transformers"] - result["top1"]["mmjax"]) <= slack
  assert "zero-shot top-1" in verify.report(result)


@pytest.mark.slow
def test_trained_export_reimports_bit_for_bit(digits):
  """HF folder -> workdir: the trained params exactly (patch bias unfolded, token
  rows back), the sentencepiece tokenizer; its export is the same folder."""
  root, out = digits["root"], digits["out"]
  back = str(root / "back")
  config = convert.import_hf(out, back)
  assert config.data.tokenizer.endswith("tokenizer.model") and config.model.text.eos_id == 2
  trained = mapping.scanned(convert.load_params(digits["workdir"])[3])
  again = mapping.scanned(convert.load_params(back)[3])
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), trained, again)
  assert all(jax.tree.leaves(same)), same
  again_out = str(root / "hf_again")
  convert.export_hf(back, again_out)
  for name in sorted(os.listdir(out)):
    with open(os.path.join(out, name), "rb") as a, open(os.path.join(again_out, name), "rb") as b:
      assert a.read() == b.read(), name


@pytest.mark.slow
def test_changed_weights_reimport_as_they_are(digits, tmp_path):
  """Weights edited after the export (fine-tuned in transformers): the sidecar no
  longer matches and the import takes the HF weights and tokenizer as they are."""
  model = transformers.CLIPModel.from_pretrained(digits["out"])
  with torch.no_grad():
    model.vision_model.embeddings.position_embedding.weight.add_(0.01)
  edited = str(tmp_path / "edited")
  model.save_pretrained(edited)
  for name in os.listdir(digits["out"]):
    if name not in os.listdir(edited):
      with open(os.path.join(digits["out"], name), "rb") as f, \
          open(os.path.join(edited, name), "wb") as g:
        g.write(f.read())
  config = convert.import_hf(edited, str(tmp_path / "wd"))
  v = config.model.text.vocab_size
  assert config.data.tokenizer.endswith("tokenizer.json") and config.model.text.eos_id == v - 1
  params = convert.load_params(str(tmp_path / "wd"))[3]
  assert not np.any(np.asarray(params["vision"]["patch_embed"]["bias"]))


# -- what transformers cannot hold ------------------------------------------------

@pytest.mark.slow
def test_main_job_is_refused_naming_each_feature(tmp_path):
  """The main job's tower (conv stem, attention pooling): refused by the CLI with
  every feature and its config key, before anything is written."""
  from experiments import clip_shapes
  c = clip_shapes.get_config("runlocal=true")
  c.model.vision.variant, c.model.text.size, c.model.embed_dim = "tiny/8", "tiny", 16
  c.model.vision.stem = "conv"  # as the full-size main job; runlocal's 32 px uses linear
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 1, 8, 1, 0, 1
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.builder_kwargs.num_train, c.data.builder_kwargs.num_validation = 64, 16
  c.data.builder_kwargs.num_test = 16
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  _train(c, workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "mmjax.convert", "--to=hf", f"--src={workdir}",
                           f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  for key in ("model.vision.stem='conv'", "model.vision.pool", "nothing was written"):
    assert key in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(out)


def test_what_clipmodel_lacks_is_named_with_its_key():
  """Each feature, with the config key that avoids it, in one error."""
  cfg = dataclasses.replace(tiny_clip_config(), loss="sigmoid")
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pool="gap",
                                                            pre_norm=False))
  with pytest.raises(ConversionError) as e:
    clip_conv.hf_config(cfg)
  for key in ("model.loss='sigmoid'", "model.vision.pool", "model.vision.pre_norm=False"):
    assert key in str(e.value)
  assert clip_conv.unsupported(tiny_clip_config()) == []


# -- the tokenizer and preprocessor files ------------------------------------------

def test_sentencepiece_converts_to_the_same_ids(tmp_path):
  """A sentencepiece model trained as the datasets train theirs (byte fallback,
  split digits, <image>), on the shapes corpus: tokenizer.json gives its ids."""
  corpus = shapes.tokenizer_corpus(0, 200, image_size=32)
  tok = tokenizer_lib.train_sentencepiece(corpus, 300)
  path = str(tmp_path / "tokenizer.model")
  tok.save(path)
  data = hf_tokenizer.from_sentencepiece(path)
  hf_tokenizer.write(str(tmp_path / "hf"), data, bos_id=tok.bos_id, eos_id=tok.eos_id,
                     pad_id=tok.pad_id, context_length=24)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  texts = corpus[:300] + ["x <image> y", "  two  spaces", "1234.5", "ünïcode ✓", ""]
  theirs = hf_tok(texts, padding="max_length", truncation=True, return_tensors="np")
  np.testing.assert_array_equal(theirs["input_ids"], tok.encode_batch(texts, 24))


def test_swap_ids_exchanges_every_mention():
  data = {"model": {"type": "BPE", "vocab": {"<pad>": 0, "</s>": 2, "a": 5}},
          "added_tokens": [{"id": 2, "content": "</s>"}],
          "post_processor": hf_tokenizer.bos_eos_template("<pad>", 0, "</s>", 2),
          "padding": {"pad_id": 5}}
  out = hf_tokenizer.swap_ids(data, 2, 5)
  assert out["model"]["vocab"] == {"<pad>": 0, "</s>": 5, "a": 2}
  assert out["added_tokens"][0]["id"] == 5 and out["padding"]["pad_id"] == 2
  assert out["post_processor"]["special_tokens"]["</s>"]["ids"] == [5]
  assert data["model"]["vocab"]["</s>"] == 2  # the input is left as it was
  assert hf_tokenizer.token_name(out, 5) == "</s>"


@pytest.mark.parametrize("mode", ["clip", "minus_one_one", "zero_one"])
def test_preprocessor_config_reads_back_as_the_same_transforms(tmp_path, mode):
  """The processor file an export writes imports as the transforms it came from,
  and CLIPImageProcessor prepares an image as mmjax does."""
  from mmjax.convert import common
  from mmjax.data import transforms
  with open(tmp_path / "preprocessor_config.json", "w") as f:
    json.dump(hf_tokenizer.preprocessor_config(32, mode), f)
  assert common.preprocessing(str(tmp_path), 32)["normalize"] == mode
  processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
  theirs = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
  ours = transforms.preprocess_image(image, 32, mode)
  assert np.abs(theirs.transpose(1, 2, 0) - ours).max() <= 1e-5
