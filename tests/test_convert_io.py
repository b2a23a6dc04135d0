"""The conversion machinery without torch: safetensors files (ours and the
library's), sharding, the rules' streaming onto a mesh, and an mmjax -> HF ->
mmjax round trip of a CLIP's params."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import tiny_clip_config
from mmjax import convert, parallel
from mmjax.convert import clip as clip_conv, hf_io, mapping, workdir as workdir_lib
from mmjax.models import clip as clip_lib


def _arrays():
  rng = np.random.default_rng(0)
  return {"w": rng.normal(size=(3, 5)).astype(np.float32),
          "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
          "h": rng.normal(size=(2, 2)).astype(np.float16),
          "scalar": np.float32(2.5).reshape(())}


def test_our_safetensors_files_read_back_exactly(tmp_path):
  from safetensors import safe_open
  arrays = _arrays()
  path = str(tmp_path / "x.safetensors")
  hf_io.save_file(arrays, path, {"format": "pt"})
  with safe_open(path, framework="np") as f:
    assert sorted(f.keys()) == sorted(arrays)
    assert f.get_tensor("scalar").shape == ()
    np.testing.assert_array_equal(f.get_tensor("w"), arrays["w"])
  for key, value in arrays.items():  # the fallback for old safetensors versions
    raw = hf_io._read_raw(path, key)
    assert raw.dtype == value.dtype and raw.shape == value.shape
    np.testing.assert_array_equal(raw.astype(np.float32), value.astype(np.float32))


def test_sharded_writing_and_reading(tmp_path):
  arrays = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}
  names = hf_io.write_safetensors(str(tmp_path), arrays.items(), max_shard_bytes=80)
  assert len(names) == 3 and os.path.exists(tmp_path / hf_io.INDEX_NAME)
  with open(tmp_path / hf_io.INDEX_NAME) as f:
    assert json.load(f)["metadata"]["total_size"] == 200
  with hf_io.SafetensorsReader(str(tmp_path)) as r:
    assert r.keys() == sorted(arrays)
    for k, v in arrays.items():
      np.testing.assert_array_equal(r.get(k), v)


def test_stacked_leaf_streams_onto_the_mesh(tmp_path):
  """A scanned leaf [L, D, N, H] built from L per-layer HF tensors, sharded over fsdp."""
  depth, d, n, h = 3, 16, 2, 4
  weights = {f"l.{i}.q.weight": np.random.default_rng(i).normal(size=(n * h, d)).astype(np.float32)
             for i in range(depth)}
  hf_io.write_safetensors(str(tmp_path), weights.items())
  rule = mapping.attention_rules("attn", "l.{i}", depth, n, h, bias=False,
                                 names=("q", "q", "q", "q"))[0]
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  abstract = {"attn": {"query": {"kernel": jax.ShapeDtypeStruct((depth, d, n, h), np.float32,
                                                               sharding=sharding)}}}
  with hf_io.SafetensorsReader(str(tmp_path)) as r:
    params = mapping.load_params(r, [rule], abstract)
  leaf = params["attn"]["query"]["kernel"]
  assert leaf.sharding == sharding
  for i in range(depth):
    want = weights[f"l.{i}.q.weight"].T.reshape(d, n, h)
    np.testing.assert_array_equal(np.asarray(leaf[i]), want)
  # And back, exactly.
  out = dict(mapping.export_tensors(params, [rule]))
  for k, v in weights.items():
    np.testing.assert_array_equal(out[k], v)


@pytest.fixture(scope="module")
def clip_params():
  """Random params of the tiny CLIP (numpy, from the abstract tree: no init compile)."""
  cfg = tiny_clip_config()
  abstract = convert.abstract_params(clip_lib.CLIP(cfg), clip_conv.init_args(cfg))
  rng = np.random.default_rng(0)
  return cfg, jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def test_clip_params_round_trip_through_hf_names(tmp_path, clip_params):
  """mmjax params -> HF tensors -> mmjax params is the identity (patch bias 0)."""
  cfg, params = clip_params
  params = dict(params, vision=clip_conv.fold_patch_bias(params["vision"]))
  model = clip_lib.CLIP(cfg)
  rules = clip_conv.rules(cfg)
  hf_io.write_safetensors(str(tmp_path), mapping.export_tensors(params, rules))
  with hf_io.SafetensorsReader(str(tmp_path)) as r:
    assert "vision_model.pre_layrnorm.weight" in r
    assert r.shape("vision_model.embeddings.patch_embedding.weight") == (32, 3, 8, 8)
    assert r.shape("text_model.encoder.layers.1.self_attn.q_proj.weight") == (32, 32)
    back = mapping.load_params(r, rules, convert.abstract_params(model, clip_conv.init_args(cfg)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, back)


def test_patch_bias_folds_into_the_position_embedding(clip_params):
  cfg, params = clip_params
  assert np.any(params["vision"]["patch_embed"]["bias"])
  folded = clip_conv.prepare_export(params, cfg)
  assert not np.any(np.asarray(folded["vision"]["patch_embed"]["bias"]))
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  encode = jax.jit(lambda p: clip_lib.CLIP(cfg).apply({"params": p}, x,
                                                      method=clip_lib.CLIP.encode_image))
  np.testing.assert_allclose(encode(params), encode(folded), atol=1e-5)


def test_scanned_form_of_unrolled_params():
  unrolled = {"enc": {"layers_0": {"w": np.ones(2)}, "layers_1": {"w": np.zeros(2)}}, "x": 1}
  out = mapping.scanned(unrolled)
  assert out["enc"]["layers"]["w"].shape == (2, 2) and out["x"] == 1


def test_restore_params_names_a_mismatch(tmp_path):
  params = {"a": np.ones((2, 3), np.float32)}
  workdir_lib.save(str(tmp_path), __import__("ml_collections").ConfigDict({"task": "x"}), params)
  got = workdir_lib.restore_params(str(tmp_path), {"a": jax.ShapeDtypeStruct((2, 3), np.float32)})
  np.testing.assert_array_equal(got["a"], params["a"])
  with pytest.raises(ValueError, match="a saved"):
    workdir_lib.restore_params(str(tmp_path), {"a": jax.ShapeDtypeStruct((3, 3), np.float32)})
