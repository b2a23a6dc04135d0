"""mmjax.embed on a converted workdir (parity with transformers) and on one
written by mmjax.train on the shapes data; the CLI; `init_from` fine-tuning."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert, embed
from mmjax.convert import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # one device is enough
  return env


# -- a workdir written by mmjax.train -------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from experiments import clip_shapes
  from mmjax.train import loop
  root = tmp_path_factory.mktemp("shapes")
  c = clip_shapes.get_config("runlocal=true")
  c.model.vision.variant, c.model.text.size, c.model.embed_dim = "tiny/8", "tiny", 16
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 1, 8, 1, 0, 1
  c.async_checkpoints = False
  c.data.data_dir = str(root / "tfds")
  c.data.builder_kwargs.num_train, c.data.builder_kwargs.num_validation = 64, 16
  c.data.builder_kwargs.num_test = 16
  workdir = str(root / "run")
  loop.train(c, workdir)
  return c, workdir


@pytest.mark.slow
def test_embed_a_trained_shapes_workdir(trained, tmp_path):
  from mmjax.data import pipeline, transforms
  from mmjax.models import clip as clip_lib
  from mmjax.train import loop
  config, workdir = trained
  # Images as a user has them: PNG files, of any size.
  from PIL import Image
  paths = []
  for i, size in enumerate([(40, 52), (32, 32), (70, 33)]):
    img = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
    path = str(tmp_path / f"s{i}.png")
    Image.fromarray(img).save(path)
    paths.append(path)
  texts = ["a red circle", "two blue squares", "a green triangle on the left"]
  out = embed.embed(workdir, paths, texts, zeroshot_labels=["red circle", "blue square"])
  assert out["image_embeds"].shape == (3, 16) and out["text_embeds"].shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1, rtol=1e-5)
  assert out["zeroshot_probs"].shape == (3, 2)
  np.testing.assert_allclose(out["zeroshot_probs"].sum(-1), 1, rtol=1e-5)

  # The same numbers as the training run's own model, params and preprocessing.
  s = loop.setup(config, workdir)
  state, _ = s["ckpt"].restore(loop.restore_target(s["abstract"], s["shardings"]))
  s["ckpt"].close()
  task = s["task"]
  px = np.stack([transforms.preprocess_image(p, config.data.image_size) for p in paths])
  ids = pipeline.dataset_tokenizer(config.data).encode_batch(texts, config.data.context_length)
  want_img = task.model.apply({"params": state.params}, jnp.asarray(px),
                              method=clip_lib.CLIP.encode_image)
  want_txt = task.model.apply({"params": state.params}, jnp.asarray(ids),
                              method=clip_lib.CLIP.encode_text)
  np.testing.assert_allclose(out["image_embeds"], want_img, atol=1e-5)
  np.testing.assert_allclose(out["text_embeds"], want_txt, atol=1e-5)


# -- a converted workdir -----------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from test_convert_clip import make_hf_clip, write_pngs
  root = tmp_path_factory.mktemp("embed_hf")
  src, out = str(root / "hf"), str(root / "wd")
  model, tok = make_hf_clip(src, "quick_gelu")
  convert.import_hf(src, out)
  return model, tok, out, write_pngs(str(root))


@pytest.mark.torch
def test_embed_matches_transformers(converted):
  import torch
  from PIL import Image
  from test_convert_clip import TEXTS, TOL, image_processor, maxdiff
  hf, tok, workdir, pngs = converted
  labels = ["cat", "dog", "photo"]
  out = embed.embed(workdir, pngs, TEXTS, zeroshot_labels=labels)
  px = image_processor(32)(images=[Image.open(p) for p in pngs], return_tensors="pt")
  ids = tok(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
  with torch.no_grad():
    ref = hf(pixel_values=px["pixel_values"], **ids)
  assert maxdiff(out["image_embeds"], ref.image_embeds) <= TOL
  assert maxdiff(out["text_embeds"], ref.text_embeds) <= TOL
  # Zero-shot: the generic template ensemble, through HF's text tower.
  from mmjax.data.pipeline import GENERIC_TEMPLATES
  prompts = [t.format(c) for c in labels for t in GENERIC_TEMPLATES]
  with torch.no_grad():
    cls = hf.get_text_features(**tok(prompts, padding="max_length", max_length=16,
                                     return_tensors="pt")).pooler_output.numpy()
  cls = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
  cls = cls.reshape(len(labels), len(GENERIC_TEMPLATES), -1).mean(1)
  cls = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
  logits = hf.logit_scale.exp().item() * ref.image_embeds.numpy() @ cls.T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  assert maxdiff(out["zeroshot_probs"], probs) <= TOL


@pytest.mark.torch
def test_convert_and_embed_command_lines(converted, tmp_path):
  from test_convert_clip import make_hf_clip
  hf, _, workdir, pngs = converted
  src, out = str(tmp_path / "hf"), str(tmp_path / "wd")
  make_hf_clip(src, "gelu")

  def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)

  r = run("mmjax.convert", f"--src={src}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(os.path.join(out, "config.json"))
  npz = str(tmp_path / "e.npz")
  r = run("mmjax.embed", f"--workdir={out}", f"--images={pngs[0]},{pngs[1]}",
          "--texts=a cat|a dog|a photo", f"--out={npz}", "--zeroshot_labels=cat,dog")
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(npz) as f:
    assert f["image_embeds"].shape == (2, 24) and f["text_embeds"].shape == (3, 24)
    assert list(f["texts"]) == ["a cat", "a dog", "a photo"]
  assert pngs[0] in r.stdout and "cat" in r.stdout and "dog" in r.stdout
  back = str(tmp_path / "back")
  r = run("mmjax.convert", "--to=hf", f"--src={out}", f"--out={back}", "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(back, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"


@pytest.mark.torch
def test_moved_converted_workdir_uses_its_own_tokenizer(converted, tmp_path):
  import shutil
  _, _, workdir, pngs = converted
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  config = workdir_lib.load_config(moved)
  config.data.tokenizer = "/nonexistent/tokenizer.json"
  with open(os.path.join(moved, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  a = embed.embed(workdir, texts=["a dog"])
  b = embed.embed(moved, texts=["a dog"])
  np.testing.assert_array_equal(a["text_embeds"], b["text_embeds"])


@pytest.mark.torch
def test_training_starts_from_a_converted_workdir(converted, tmp_path):
  """init.clip_workdir: a config with the converted model.* starts from its params."""
  import ml_collections
  from experiments import clip_shapes
  from mmjax.train import tasks
  _, _, workdir, _ = converted
  conv = workdir_lib.load_config(workdir)
  c = clip_shapes.get_config("runlocal=true")
  c.unlock()
  c.model = conv.model
  c.data.tokenizer, c.data.image_size = conv.data.tokenizer, conv.data.image_size
  c.data.context_length = conv.data.context_length
  c.init = {"clip_workdir": workdir}
  task = tasks.build_task(ml_collections.ConfigDict(c.to_dict()))
  abstract = jax.eval_shape(lambda: __import__("flax").linen.meta.unbox(
      task.init(jax.random.PRNGKey(0))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  fresh = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
  started = task.initial_params(fresh, jax.tree.map(lambda _: device, abstract))
  _, _, _, want = convert.load_params(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               started, want)
