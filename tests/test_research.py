"""The research studies (research/) still run: the look-up study reads the
right colours off a scene, and runs, resumes and refuses other flags on a tiny
instruction set; its projectors and LLM overrides build what they name."""

import json

import jax
import numpy as np
import pytest

from mmjax.data import instruct, shapes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.models import llm as llm_lib
from research import lookup_plateau

pytestmark = pytest.mark.slow


def test_lookup_plateau_oracle_colours_and_rows():
  ex = shapes.make_example(0, "train", 3, image_size=64, single_fraction=0.0)
  objects = json.loads(ex["scene"])["objects"]
  got = set(lookup_plateau.patch_colors(ex["image"], 8).tolist()) - {lookup_plateau.BACKGROUND}
  assert got <= {shapes.COLOR_NAMES.index(o["color"]) for o in objects}
  assert shapes.COLOR_NAMES.index(objects[0]["color"]) in got  # the largest object is found
  blank = np.zeros((64, 64, 3), np.uint8)
  assert (lookup_plateau.patch_colors(blank, 8) == lookup_plateau.BACKGROUND).all()


def test_lookup_plateau_tiny_study(tmp_path):
  data = tmp_path / "data"
  instruct.main([f"--out={data}", "--num_train=24", "--num_eval=4"])
  argv = [f"--out={tmp_path / 'study'}", f"--data={data}", "--num_train=24", "--num_eval=4",
          "--steps=4", "--eval_every=2", "--batch=8", "--runs=existence_alone,mix"]
  r = lookup_plateau.main(argv)
  alone, mix = r["runs"]["existence_alone"], r["runs"]["mix"]
  assert [row["step"] for row in mix] == [2, 4]
  assert sum(mix[-1]["answers_seen"].values()) == 4 * 8
  assert set(alone[-1]["answers_seen"]) == {"existence"}
  assert set(alone[-1]["accuracy_by_type"]) == {"existence"}
  assert {"color", "existence", "location"} <= set(mix[-1]["accuracy_by_type"])
  assert all(0 <= v <= 1 for v in mix[-1]["accuracy_by_type"].values())
  for name in ("results.json", "lookup_plateau.md", "lookup_plateau.png"):
    assert (tmp_path / "study" / name).stat().st_size > 0
  assert "| existence_alone | 4 | 1.00 |" in (tmp_path / "study" / "lookup_plateau.md").read_text()
  # a second call resumes (timings included: nothing retrained); other flags are refused
  assert lookup_plateau.main(argv)["runs"] == r["runs"]
  with pytest.raises(SystemExit, match="other flags"):
    lookup_plateau.main([*argv[:-1], "--runs=mix", "--lr=0.01"])


def test_lookup_plateau_image_after_the_question_and_positions(tmp_path):
  data = tmp_path / "data"
  instruct.main([f"--out={data}", "--num_train=24", "--num_eval=4"])
  tok = tokenizer_lib.load_tokenizer(str(data / "tokenizer.model"))
  template = instruct.get_template("vicuna_v1", "A chat.")
  q, a = "Where is the red shape?", "On the left."
  before = lookup_plateau.encode(q, a, tok, template, 4)
  after = lookup_plateau.encode(q, a, tok, template, 4, image_after=True)
  for ids, labels, is_image in (before, after):
    assert is_image.sum() == 4 and (ids[is_image] == 1).all() and (labels[is_image] < 0).all()
    assert tok.decode([int(t) for t in labels[labels >= 0]]).strip() == a  # the same answer
  # the question is the text after the image in one layout, before it in the other
  def text_before_image(ids, is_image):
    return tok.decode([int(t) for t in ids[:np.flatnonzero(is_image).min()]])
  assert q not in text_before_image(before[0], before[2])
  assert q in text_before_image(after[0], after[2])
  argv = [f"--out={tmp_path / 'study'}", f"--data={data}", "--num_train=24", "--num_eval=4",
          "--steps=2", "--eval_every=2", "--batch=8", "--runs=location_alone", "--image=after",
          "--position=rowcol", "--focus=location"]
  r = lookup_plateau.main(argv)
  assert r["flags"]["image"] == "after" and r["flags"]["position"] == "rowcol"
  assert set(r["runs"]["location_alone"][-1]["answers_seen"]) == {"location"}
  report = (tmp_path / "study" / "lookup_plateau.md").read_text()
  assert "location share" in report and "| location_alone | 2 | 1.00 |" in report
  # the model reads the position: its projector takes colour + row + column one-hots
  model = lookup_plateau.OracleLLaVA(llm_lib.llm_config("nano", vocab_size=64, depth=1), 2,
                                     rowcol=True)
  ids = np.ones((1, 6), np.int32)
  is_image = np.array([[False, True, True, True, True, False]])
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32), ids, is_image)
  assert params["params"]["projector"]["kernel"].shape[0] == lookup_plateau.BACKGROUND + 1 + 4


def test_lookup_plateau_projectors_and_llm_overrides(tmp_path):
  cfg = llm_lib.llm_config("nano", vocab_size=64, depth=1)
  ids = np.ones((1, 6), np.int32)
  is_image = np.array([[False, True, True, True, True, False]])
  colors = np.array([[0, 1, 1, lookup_plateau.BACKGROUND]], np.int32)
  def kernels(projector, rowcol=True):
    model = lookup_plateau.OracleLLaVA(cfg, 2, rowcol=rowcol, projector=projector)
    p = model.init(jax.random.PRNGKey(0), colors, ids, is_image)["params"]
    return {k: v["kernel"].shape for k, v in p.items() if k.startswith("projector")}
  one_hots = lookup_plateau.BACKGROUND + 1 + 4  # colour, then row and column of a 2 x 2 grid
  assert kernels("linear") == {"projector": (one_hots, cfg.width)}
  # outer: one more input per (colour, row) and (colour, column) pair
  assert kernels("outer") == {"projector": (one_hots + (lookup_plateau.BACKGROUND + 1) * 4,
                                            cfg.width)}
  assert kernels("mlp") == {"projector_hidden": (one_hots, cfg.width),
                            "projector": (cfg.width, cfg.width)}
  with pytest.raises(ValueError, match="rowcol"):
    kernels("outer", rowcol=False)
  assert lookup_plateau.llm_overrides("num_heads=8,num_kv_heads=8") == {"num_heads": 8,
                                                                        "num_kv_heads": 8}
  assert lookup_plateau.llm_overrides("norm_eps=1e-5,tie_embeddings=true") == {
      "norm_eps": 1e-5, "tie_embeddings": True}
  for bad, match in (("heads=8", "unknown config argument 'heads'"), ("num_heads", "key=value"),
                     ("depth=3", "own flag")):
    with pytest.raises(ValueError, match=match):
      lookup_plateau.llm_overrides(bad)
  with pytest.raises(SystemExit):
    lookup_plateau.parse_args(["--out=x", "--projector=outer"])  # without --position=rowcol
  data = tmp_path / "data"
  instruct.main([f"--out={data}", "--num_train=24", "--num_eval=4"])
  argv = [f"--out={tmp_path / 'study'}", f"--data={data}", "--num_train=24", "--num_eval=4",
          "--steps=2", "--eval_every=2", "--batch=8", "--runs=location_alone", "--focus=location",
          "--position=rowcol", "--projector=outer", "--llm=num_kv_heads=4"]
  r = lookup_plateau.main(argv)
  assert r["flags"]["projector"] == "outer" and r["flags"]["llm"] == "num_kv_heads=4"
  assert len(r["runs"]["location_alone"]) == 1
