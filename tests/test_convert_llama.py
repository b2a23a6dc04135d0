"""HF LlamaForCausalLM <-> mmjax LLM: parity (GQA, untied and tied, explicit
head_dim, rope theta), exact round trips, the LM task on a converted workdir,
and the unsupported fields."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.convert import workdir as workdir_lib
from mmjax.convert.mapping import ConversionError
from mmjax.models import llm as llm_lib

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert_clip import (TOL, assert_same_tensors, load_tensors, maxdiff,  # noqa: E402
                               randomize_)

VARIANTS = {
    # GQA (4 query heads share 2 kv heads), untied head, a non-default theta.
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       rope_theta=5000.0),
    # Tied embeddings, head_dim 16 != hidden / heads, theta 5e5 (Llama 3).
    "tied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                 tie_word_embeddings=True, rope_theta=500000.0),
}


def hf_llama_config(**overrides):
  base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
  base.update(overrides)
  return transformers.LlamaConfig(**base)


def make_hf_llama(directory: str, seed: int = 0, tokenizer: bool = False, **overrides):
  os.makedirs(directory, exist_ok=True)
  torch.manual_seed(seed)
  model = randomize_(transformers.LlamaForCausalLM(hf_llama_config(**overrides)).eval(),
                     seed=seed)
  model.save_pretrained(directory)
  if tokenizer:  # a sentencepiece model, as Llama folders ship tokenizer.model
    from mmjax.data.tokenizer import train_sentencepiece
    tok = train_sentencepiece(["a red circle", "two blue squares", "hello world"] * 20, 101)
    tok.save(os.path.join(directory, "tokenizer.model"))
  return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(f"llama_{request.param}")
  src, out = str(root / "hf"), str(root / "wd")
  model = make_hf_llama(src, **VARIANTS[request.param])
  convert.import_hf(src, out)
  return model, src, out


def test_llama_parity_with_transformers(converted):
  hf, _, out = converted
  config, _, cfg, params = convert.load_params(out)
  assert cfg.num_kv_heads == hf.config.num_key_value_heads
  assert cfg.tie_embeddings == hf.config.tie_word_embeddings
  assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
  assert cfg.head_size == hf.config.head_dim
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 101, (2, 12))
  mask = np.ones_like(ids)
  mask[1, 8:] = 0  # a right-padded row
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             output_hidden_states=True)
    last = hf.model(input_ids=torch.tensor(ids),
                    attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  logits, _, hidden = llm_lib.LLM(cfg).apply({"params": params}, jnp.asarray(ids),
                                            padding=jnp.asarray(mask, bool), return_hidden=True)
  valid = mask.astype(bool)
  diffs = {"logits": maxdiff(np.asarray(logits)[valid], ref.logits.numpy()[valid]),
           "last_hidden": maxdiff(np.asarray(hidden)[valid], last[valid])}
  print("max abs diffs:", diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_llama_round_trip_reproduces_every_tensor(converted, tmp_path):
  hf, src, out = converted
  back = str(tmp_path / "back")
  convert.export_hf(out, back)
  assert_same_tensors(load_tensors(src), load_tensors(back))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(back).eval()
  for key in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps"):
    assert getattr(reloaded.config, key) == getattr(hf.config, key), key
  assert reloaded.config.rope_parameters["rope_theta"] == hf.config.rope_parameters["rope_theta"]
  ids = torch.tensor([[5, 6, 7, 8]])
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf(ids).logits.numpy())


def test_lm_task_builds_from_a_converted_workdir(tmp_path):
  from mmjax.train import tasks
  src, out = str(tmp_path / "hf"), str(tmp_path / "wd")
  make_hf_llama(src, tokenizer=True, **VARIANTS["gqa_untied"])
  config = convert.import_hf(src, out)
  assert config.task == "lm" and config.data.tokenizer.endswith("tokenizer.model")
  task = tasks.build_task(workdir_lib.load_config(out))
  assert task.model_config == convert.family_for_task("lm").model_config(config)


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
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.rope_type"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_llama_fields_are_named(converted, tmp_path, edit, field):
  _, src, _ = converted
  with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
    convert.import_hf(_edit(src, tmp_path, edit), str(tmp_path / "wd"))
