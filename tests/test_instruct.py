"""Instruction data: templates, label masks token by token, the mismatch check,
the rule-based generator, answer normalisation and the CLI's LLaVA JSON."""

import json
import os
import re

import numpy as np
import pytest

from mmjax.data import instruct, shapes, sources
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.eval import vqa


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("instruct"))
  instruct.main([f"--out={out}", "--num_train=24", "--num_eval=4", "--emit_prompts"])
  return out


@pytest.fixture(scope="module")
def tok(data):
  return tokenizer_lib.load_tokenizer(os.path.join(data, "tokenizer.model"))


CONV = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many objects are there in the image?"},
        {"from": "gpt", "value": "Two."}]


def test_vicuna_render():
  text = instruct.render(CONV, instruct.get_template("vicuna_v1"))
  assert text == (instruct.VICUNA_SYSTEM + " USER: <image>\nWhat color is the circle? "
                  "ASSISTANT: Red.</s>USER: How many objects are there in the image? "
                  "ASSISTANT: Two.</s>")
  assert instruct.render(CONV[:1], instruct.get_template("vicuna_v1", system="")).endswith(
      "circle? ASSISTANT:")


def test_labels_cover_exactly_the_assistant_tokens(tok):
  tmpl = instruct.get_template("vicuna_v1")
  tokens, labels = instruct.tokenize(CONV, tok, tmpl)
  assert tokens[0] == tok.bos_id and len(tokens) == len(labels)
  labelled = labels != instruct.IGNORE_INDEX
  np.testing.assert_array_equal(labels[labelled], tokens[labelled])
  # Token by token: each round is [instruction (ignored)] + [answer + EOS (labelled)].
  want = [tok.bos_id], [instruct.IGNORE_INDEX]
  for k, (q, a) in enumerate([(CONV[0]["value"], "Red."), (CONV[2]["value"], "Two.")]):
    inst = (instruct.VICUNA_SYSTEM + " " if k == 0 else "") + f"USER: {q} ASSISTANT:"
    inst_ids = tok.encode(inst)
    answer_ids = tok.encode(inst + " " + a)[len(inst_ids):] + [tok.eos_id]
    want[0].extend(inst_ids + answer_ids)
    want[1].extend([instruct.IGNORE_INDEX] * len(inst_ids) + answer_ids)
  np.testing.assert_array_equal(tokens, want[0])
  np.testing.assert_array_equal(labels, want[1])
  assert tok.decode(tokens[labelled]) .replace(" ", "") == "Red.Two."
  assert (tokens == tok.eos_id).sum() == 2 and labelled[tokens == tok.eos_id].all()
  assert (tokens == 4).sum() == 1  # one <image> placeholder


def test_generation_prompt_is_the_training_prefix(tok):
  tmpl = instruct.get_template("vicuna_v1")
  prompt, prompt_labels = instruct.tokenize(CONV[:1], tok, tmpl)
  full, _ = instruct.tokenize(CONV[:2], tok, tmpl)
  np.testing.assert_array_equal(full[:len(prompt)], prompt)
  assert (prompt_labels == instruct.IGNORE_INDEX).all()


def test_plain_template_labels_the_caption(tok):
  conv = [{"from": "human", "value": "anything: plain drops it"},
          {"from": "gpt", "value": "a red circle"}]
  tokens, labels = instruct.tokenize(conv, tok, instruct.get_template("plain"))
  assert tokens[0] == tok.bos_id and 4 in tokens[:3]  # BOS, <image>
  labelled = labels != instruct.IGNORE_INDEX
  assert tok.decode(tokens[labelled]) == "a red circle\n"
  assert not labelled[:np.argmax(tokens == 4) + 1].any()


class _MergingTokenizer:
  """Whole-word tokens, except that ":" merges with a following space (a
  separator that tokenises differently in context)."""
  bos_id, eos_id, pad_id = 1, 2, 0

  def encode(self, text):
    return [hash(p) % 1000 + 10 for p in text.replace(": ", ":_").split(" ")]


def test_tokenization_mismatch_raises_instead_of_masking():
  with pytest.raises(instruct.TokenizationMismatchError, match="sample s7 round 0"):
    instruct.tokenize(CONV, _MergingTokenizer(), instruct.get_template("vicuna_v1"),
                      sample_id="s7")


def test_truncation_keeps_tokens_and_labels_aligned(tok):
  tokens, labels = instruct.tokenize(CONV, tok, instruct.get_template("vicuna_v1"), max_len=20)
  assert len(tokens) == len(labels) == 20


def _scene():
  objs = [dict(shape="circle", color="red", size="large", center=[6.0, 6.0], radius=5.0,
               box=[0.05, 0.05, 0.35, 0.35]),
          dict(shape="square", color="blue", size="small", center=[26.0, 20.0], radius=2.5,
               box=[0.75, 0.55, 0.9, 0.7])]
  return {"image_size": 32, "background": [40, 40, 40], "objects": objs}


def test_scene_questions_are_answered_from_the_scene():
  for seed in range(6):
    qs = {t: (q, a) for t, q, a in instruct.scene_questions(_scene(), np.random.default_rng(seed),
                                                            answers="short")}
    assert set(qs) == set(instruct.QUESTION_TYPES)
    assert "largest" in qs["color"][0] and qs["color"][1] == "Red."
    assert qs["shape"][1] == "Circle."
    assert qs["count"][1] == "Two."
    q, a = qs["location"]
    assert a == ("In the top left." if "red shape" in q else "On the right.")
    q, a = qs["relation"]
    assert a == ("To the left." if q.index("red") < q.index("blue") else "To the right.")
    q, a = qs["existence"]
    assert a == ("Yes." if ("red" in q or "blue" in q) else "No.")
    q, a = qs["size"]
    assert a == ("Large." if "red shape" in q else "Small.")


def test_restated_answers_name_their_object_before_the_answer():
  seen = set()
  for seed in range(12):
    rng = np.random.default_rng(seed)
    restated = instruct.scene_questions(_scene(), rng, answers="restate")
    short = instruct.scene_questions(_scene(), np.random.default_rng(seed), answers="short")
    # the same questions in the same order (one rng stream), only the answers differ
    assert [(t, q) for t, q, _ in restated] == [(t, q) for t, q, _ in short]
    qs = {t: (q, a) for t, q, a in restated}
    assert qs["color"][1] == "Red." and qs["count"][1] == "Two."  # unchanged
    q, a = qs["location"]
    assert a == ("The red shape is in the top left." if "red shape" in q
                 else "The blue shape is on the right.")
    q, a = qs["relation"]
    assert a == ("The red shape is to the left of the blue shape." if q.index("red") < q.index("blue")
                 else "The blue shape is to the right of the red shape.")
    q, a = qs["existence"]
    color = next(c for c in shapes.COLOR_NAMES if re.search(rf"\b{c}\b", q))
    assert a == f"Anything {color}: {'yes' if color in ('red', 'blue') else 'no'}."
    assert " a orange" not in q  # the article agrees ("an orange")
    seen.add(a.endswith("yes."))
    q, a = qs["size"]
    assert a == ("The red shape is large." if "red shape" in q else "The blue shape is small.")
  assert seen == {True, False}
  with pytest.raises(ValueError, match="answers must be one of"):
    instruct.scene_questions(_scene(), np.random.default_rng(0), answers="long")


def _question_types(scene) -> dict[str, str]:
  """question -> type, over many draws of the scene's questions."""
  return {q: t for seed in range(200)
          for t, q, _ in instruct.scene_questions(scene, np.random.default_rng(seed))}


def test_conversation_asks_existence_existence_turns_times_about_distinct_colours():
  scene = _scene()
  kinds = _question_types(scene)
  answers = {q: a for seed in range(200)
             for _, q, a in instruct.scene_questions(scene, np.random.default_rng(seed))}
  yes_no = set()
  for seed in range(40):
    turns = instruct.conversation(scene, np.random.default_rng(seed), 4, existence_turns=2)
    assert [t["from"] for t in turns] == ["human", "gpt"] * 4
    assert turns[0]["value"].startswith("<image>\n")
    assert all("<image>" not in t["value"] for t in turns[1:])
    asked = [t["value"].replace("<image>\n", "") for t in turns[0::2]]
    replies = [t["value"] for t in turns[1::2]]
    types = [kinds[q] for q in asked]
    assert types.count("existence") == 2, asked
    others = [t for t in types if t != "existence"]
    assert len(set(others)) == 2  # two other, distinct types
    colours = [next(c for c in shapes.COLOR_NAMES if re.search(rf"\b{c}\b", q))
               for q, t in zip(asked, types) if t == "existence"]
    assert len(set(colours)) == 2, asked
    for q, a, t in zip(asked, replies, types):
      if t == "existence":
        colour = next(c for c in shapes.COLOR_NAMES if re.search(rf"\b{c}\b", q))
        assert a == ("Yes." if colour in ("red", "blue") else "No."), q
        yes_no.add(a)
      else:
        assert answers[q] == a, q
  assert yes_no == {"Yes.", "No."}
  # existence_turns=0: distinct types, so existence at most once
  for seed in range(20):
    turns = instruct.conversation(scene, np.random.default_rng(seed), 4)
    types = [kinds[t["value"].replace("<image>\n", "")] for t in turns[0::2]]
    assert len(set(types)) == 4
  for bad in (5, -1):
    with pytest.raises(ValueError, match="existence_turns must be in"):
      instruct.conversation(scene, np.random.default_rng(0), 4, existence_turns=bad)


def test_relation_answers_follow_the_geometry():
  scene = _scene()
  a, b = scene["objects"]
  assert shapes.relation(a, b) == "to the left of"
  _, desc = instruct.detailed_description(scene, np.random.default_rng(0))
  assert desc == ("The image shows two shapes on a dark gray background. A large red circle is "
                  "in the top left. A small blue square is on the right. The red circle is to "
                  "the left of the blue square.")
  q, answer = instruct.complex_reasoning(scene, np.random.default_rng(1))
  assert answer.split(".")[0] in ("One", "The red circle", "No")


def test_grounded_conversation_describes_the_scene_in_place_of_the_image():
  scene = _scene()
  rec = instruct.grounded_conversation(scene, np.random.default_rng(3), 4, "s-text")
  first = rec["conversations"][0]["value"]
  assert "<image>" not in json.dumps(rec) and "image" not in rec
  _, desc = instruct.detailed_description(scene, np.random.default_rng(0))
  assert first.startswith(desc + "\n")  # every object, its size, colour, shape and place
  # The questions are the image conversation's, answered from the same scene.
  # (for one scene, each question's answer is fixed: collect them over many draws)
  answers = {q: a for seed in range(200)
             for _, q, a in instruct.scene_questions(scene, np.random.default_rng(seed))}
  turns = rec["conversations"]
  assert [t["from"] for t in turns] == ["human", "gpt"] * 4
  asked = [first.split("\n", 1)[1]] + [t["value"] for t in turns[2::2]]
  for q, a in zip(asked, [t["value"] for t in turns[1::2]]):
    assert answers[q] == a, q


def test_answer_normalisation_and_accuracy():
  assert instruct.normalize_answer("  The Red circle!") == "red circle"
  assert instruct.answer_matches("3", "Three.")
  assert not instruct.answer_matches("Red.", "Blue.")
  out = vqa.accuracy(["Red.", "two", "Left."], ["Red.", "Two.", "Right."],
                     ["color", "count", "relation"])
  assert out["vqa_accuracy"] == pytest.approx(2 / 3)
  assert out["vqa_accuracy/relation"] == 0.0 and out["vqa_accuracy/count"] == 1.0


def test_cli_writes_llava_json_images_and_prompts(data, tok):
  for name in ("captions", "instruct", "captions_eval", "vqa_eval"):
    records = json.load(open(os.path.join(data, f"{name}.json")))
    assert records, name
    for r in records:
      assert {"id", "image", "conversations"} <= set(r)
      assert r["conversations"][0]["from"] == "human"
      assert os.path.exists(os.path.join(data, r["image"]))
  settings = json.load(open(os.path.join(data, "settings.json")))
  assert settings["existence_turns"] == instruct.Settings().existence_turns == 2
  convs = [r for r in json.load(open(os.path.join(data, "instruct.json")))
           if r["type"] == "conversation"]
  share = np.mean([t["value"].endswith(("Yes.", "No.")) for r in convs
                   for t in r["conversations"][1::2]])
  assert share == 0.5  # two of the four answers
  grounded = json.load(open(os.path.join(data, "grounded.json")))
  assert len(grounded) == 24 and all("image" not in r for r in grounded)
  assert all(r["conversations"][0]["value"].startswith("The image shows") for r in grounded)
  instructs = json.load(open(os.path.join(data, "instruct.json")))
  assert {r["type"] for r in instructs} == {"conversation", "detail", "reasoning"}
  assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in instructs)
  evals = json.load(open(os.path.join(data, "vqa_eval.json")))
  assert all(r["image"].startswith("images/eval/") for r in evals)
  assert {r["question_type"] for r in evals} >= {"color", "count", "location", "existence"}
  train_images = {r["image"] for r in instructs}
  assert not train_images & {r["image"] for r in evals}  # held-out scenes
  # The pipeline's LLaVA source reads the files, and every record tokenises.
  src = sources.LlavaSource(os.path.join(data, "instruct.json"), data)
  ex = src[0]
  size = instruct.Settings().image_size
  assert ex["image"].shape == (size, size, 3) and not ex["bad"]
  tmpl = instruct.get_template("vicuna_v1")
  for r in instructs:
    instruct.tokenize(r["conversations"], tok, tmpl, sample_id=r["id"])
  prompts = [json.loads(l) for l in open(os.path.join(data, "prompts", "conversation.jsonl"))]
  msgs = prompts[0]["messages"]
  assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
  assert "Boxes:" in msgs[-1]["content"] and "Captions:" in msgs[-1]["content"]


def test_cli_restated_answers_reach_every_file_and_tokenise(tmp_path):
  out = str(tmp_path)
  instruct.main([f"--out={out}", "--num_train=24", "--num_eval=4", "--answers=restate"])
  assert json.load(open(os.path.join(out, "settings.json")))["answers"] == "restate"
  tok = tokenizer_lib.load_tokenizer(os.path.join(out, "tokenizer.model"))
  tmpl = instruct.get_template("vicuna_v1")
  evals = json.load(open(os.path.join(out, "vqa_eval.json")))
  by_type = {}
  for r in evals:
    by_type.setdefault(r["question_type"], []).append(r["answer"])
  assert all(a.startswith("The ") and " is " in a for a in by_type["location"] + by_type["size"])
  assert all(re.fullmatch(r"Anything \w+: (yes|no)\.", a) for a in by_type["existence"])
  assert all(a.endswith(".") and len(a.split()) == 1 for a in by_type["color"] + by_type["count"])
  for name in ("instruct", "grounded", "vqa_eval", "grounded_eval"):
    for r in json.load(open(os.path.join(out, f"{name}.json"))):
      instruct.tokenize(r["conversations"], tok, tmpl, sample_id=r["id"])  # no mismatch
  texts = [t["value"] for name in ("instruct", "grounded")
           for r in json.load(open(os.path.join(out, f"{name}.json"))) for t in r["conversations"]]
  assert any(t.startswith("Anything ") for t in texts)  # the training data is restated too
