"""The embedded synthetic scenes and the TFDS builders."""

import json
import re

import numpy as np
import pytest

from mmjax.data import builders, pipeline, shapes

SMALL = dict(num_train=200, num_validation=50, num_test=50, image_size=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def shapes_builder(data_dir):
  return builders.prepare("shapes", data_dir, **SMALL)


def _examples(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def test_generator_is_deterministic():
  for i in range(5):
    a = shapes.make_example(3, "train", i, image_size=48)
    b = shapes.make_example(3, "train", i, image_size=48)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["captions"] == b["captions"] and a["scene"] == b["scene"]
  other = shapes.make_example(4, "train", 0, image_size=48)
  assert other["scene"] != shapes.make_example(3, "train", 0, image_size=48)["scene"]


@pytest.mark.parametrize("size", [32, 64])
def test_boxes_enclose_the_drawn_pixels(size):
  for i in range(40):
    ex = shapes.make_example(0, "validation", i, image_size=size)
    scene = json.loads(ex["scene"])
    image = ex["image"].astype(int)
    drawn = np.any(image != np.asarray(scene["background"]), axis=-1)
    centres = (np.arange(size) + 0.5) / size
    text_boxes = [[float(v) for v in re.findall(r"[\d.]+", line.split(":")[1])]
                  for line in ex["boxes"].splitlines()]
    assert len(text_boxes) == len(scene["objects"]) == ex["num_objects"]
    covered = np.zeros_like(drawn)
    for obj, text_box in zip(scene["objects"], text_boxes):
      x0, y0, x1, y1 = obj["box"]
      inside = ((centres[None, :] > x0) & (centres[None, :] < x1)
                & (centres[:, None] > y0) & (centres[:, None] < y1))
      covered |= inside
      # Tight: every edge row and column of the box holds drawn pixels.
      rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
      for r in (rows[0], rows[-1]):
        assert drawn[r, cols].any()
      for c in (cols[0], cols[-1]):
        assert drawn[rows, c].any()
      # The 2-decimal text box selects the same pixels.
      tx0, ty0, tx1, ty1 = text_box
      text_inside = ((centres[None, :] > tx0) & (centres[None, :] < tx1)
                     & (centres[:, None] > ty0) & (centres[:, None] < ty1))
      np.testing.assert_array_equal(text_inside, inside)
    assert not (drawn & ~covered).any(), f"example {i}: drawn pixels outside every box"


def test_scene_fields_and_label():
  singles = 0
  for i in range(100):
    ex = shapes.make_example(1, "train", i, image_size=32)
    scene = json.loads(ex["scene"])
    objs = scene["objects"]
    assert 1 <= len(objs) <= 4 and ex["num_objects"] == len(objs)
    assert objs[0]["radius"] == max(o["radius"] for o in objs)
    assert ex["label"] == shapes.class_index(objs[0]["color"], objs[0]["shape"])
    assert shapes.class_names()[ex["label"]] == f"{objs[0]['color']} {objs[0]['shape']}"
    assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
    assert all(o["size"] in shapes.SIZES for o in objs)
    singles += ex["num_objects"] == 1
  assert singles == 50  # single_fraction 0.5, exactly


def test_captions_are_paraphrases_of_the_scene():
  for i in range(30):
    ex = shapes.make_example(0, "train", i, image_size=32)
    main = json.loads(ex["scene"])["objects"][0]
    assert len(ex["captions"]) == 5 and len(set(ex["captions"])) == 5
    for caption in ex["captions"]:
      assert main["color"] in caption and main["shape"] in caption, caption
    for line in ex["boxes"].splitlines():
      assert re.fullmatch(r"[a-z]+ [a-z]+: \[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", line)


def test_held_out_pairs_cover_every_colour_and_shape():
  held = shapes.held_out_pairs(0.15)
  assert len(held) == 7
  train_pairs = {(c, s) for c in shapes.COLOR_NAMES for s in shapes.SHAPES} - held
  assert {c for c, _ in train_pairs} == set(shapes.COLOR_NAMES)
  assert {s for _, s in train_pairs} == set(shapes.SHAPES)
  assert shapes.held_out_pairs(0.15) == held  # fixed, not seeded


def test_held_out_compositions_absent_from_train(shapes_builder):
  held = shapes.held_out_pairs(0.15)
  seen_colors, seen_shapes = set(), set()
  for ex in _examples(shapes_builder, "train"):
    for obj in json.loads(ex["scene"])["objects"]:
      assert (obj["color"], obj["shape"]) not in held
      seen_colors.add(obj["color"])
      seen_shapes.add(obj["shape"])
  assert seen_colors == set(shapes.COLOR_NAMES) and seen_shapes == set(shapes.SHAPES)
  held_labels = set(shapes.held_out_labels(0.15))
  eval_labels = [ex["label"] for split in ("validation", "test")
                 for ex in _examples(shapes_builder, split)]
  assert held_labels & set(eval_labels), "held-out pairs must be main objects in eval splits"


def test_prepared_shapes(shapes_builder, data_dir):
  splits = shapes_builder.info.splits
  assert {k: splits[k].num_examples for k in splits} == {"train": 200, "validation": 50,
                                                         "test": 50}
  ex = shapes_builder.as_data_source("train")[7]
  direct = shapes.make_example(0, "train", 7, image_size=32)
  np.testing.assert_array_equal(ex["image"], direct["image"])  # records stay in order
  assert [c.decode() for c in ex["captions"]] == direct["captions"]
  assert builders.label_names(shapes_builder) == shapes.class_names()
  # A second prepare reuses the files.
  again = builders.prepare("shapes", data_dir, **SMALL)
  assert again.data_dir == shapes_builder.data_dir
  cfg = pipeline.default_data_config("shapes")
  assert len(pipeline.prompt_templates(cfg)) >= 4
  assert all("{}" in t for t in pipeline.prompt_templates(cfg))


def test_default_tokenizer_knows_the_words(shapes_builder):
  from mmjax.data import tokenizer
  tok = tokenizer.load_tokenizer(builders.tokenizer_path(shapes_builder))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for word in ["red", "circle", "left", "above", "yes", "how", "many", "color", "three"]:
    ids = tok.encode(word)
    assert len(ids) == 1, (word, ids)


def test_digits(data_dir):
  builder = builders.prepare("digits", data_dir, image_size=24)
  splits = builder.info.splits
  assert splits["train"].num_examples + splits["test"].num_examples == 1797
  assert splits["test"].num_examples == 359
  ex = builder.as_data_source("test")[0]
  assert ex["image"].shape == (24, 24, 3) and ex["image"].dtype == np.uint8
  word = builders.DIGIT_WORDS[ex["label"]]
  assert all(word in c.decode() or str(ex["label"]) in c.decode() for c in ex["captions"])
  cfg = pipeline.default_data_config("digits")
  assert pipeline.class_names(cfg) == ["zero", "one", "two", "three", "four", "five", "six",
                                       "seven", "eight", "nine"]


def test_unknown_dataset_names_the_known_ones(data_dir):
  with pytest.raises(ValueError, match=r"no_such_dataset.*shapes.*digits"):
    builders.prepare("no_such_dataset", data_dir)
  with pytest.raises(ValueError, match=r"num_trian"):
    builders.prepare("shapes", data_dir, num_trian=5)
  # A TFDS catalogue name that is not prepared: say how to prepare it.
  with pytest.raises(ValueError, match=r"'mnist' is not prepared.*--file_format=array_record"):
    builders.prepare("mnist", data_dir)


def test_prepare_from_the_command_line(tmp_path, capsys):
  from mmjax.data import __main__ as cli
  cli.main(["shapes", f"--data_dir={tmp_path}", "num_train=20", "num_validation=4",
            "num_test=4", "image_size=16", "held_out_fraction=0.2"])
  assert "train: 20 examples" in capsys.readouterr().out
