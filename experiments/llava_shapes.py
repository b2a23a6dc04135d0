"""LLaVA on the embedded shapes scenes, on a CPU in minutes: stage 1 aligns the
projector on captions (CLIP tower and LM frozen), stage 2 tunes projector and LM
on generated visual instructions (CLIP tower frozen).

  python -m mmjax.train --config=experiments/llava_shapes.py:stage=1,clip=DIR/clip,lm=DIR/lm \\
      --workdir=DIR/stage1
  python -m mmjax.train --config=experiments/llava_shapes.py:stage=2,stage1=DIR/stage1 \\
      --workdir=DIR/stage2

`bash launch/llava_shapes.sh DIR` runs CLIP, the LM and both stages in order.

The LLM reads the tower's 8 x 8 patch tokens merged 2 x 2 (`merge`, 16 tokens:
1.3x faster stage 2 at the same accuracy) with a position embedding
(`posemb`); both are departures from LLaVA, off in its real-scale configs.
"""

import ml_collections

from experiments import clip_shapes, common
from mmjax.data.pipeline import default_data_config


def instruct_data(a) -> ml_collections.ConfigDict:
  """The generated instruction data (mmjax.data.instruct), shared by the LM config."""
  d = default_data_config("llava")
  d.image_size = a.image_size
  d.transforms.pad_to_square = False  # square already
  d.instruct = ml_collections.ConfigDict(dict(
      num_train=a.num_train, num_eval=a.num_eval, image_size=a.image_size, seed=0, turns=4,
      existence_turns=a.existence_turns, answers=a.answers))
  d.instruct_dir = a.data or None  # None: a cache folder named by the settings
  d.template = "vicuna_v1"
  # A short system prompt: Vicuna's 29-token one would cost a quarter of each
  # row on a CPU (None: the template's own).
  d.system_prompt = "A chat between a user and an assistant."
  d.max_len = 96  # text tokens; the LLM sees max_len - 1 + image tokens
  d.seq_len = 160  # packed rows of the LM task (a described scene and its conversation)
  d.caption_json_path = None
  d.caption_eval_json_path = None
  d.prefetch = 4
  return d


def model_config(a) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      # The tower of experiments/clip_shapes.py (clip_shapes.TOWER), read token
      # by token: no pooling; a class token only where that CLIP pools with one.
      "vision": {"variant": f"{a.vision}/{a.patch}", "pool": "none", "stem": a.stem,
                 "num_prefix_tokens": int(a.pool == "cls"), "pre_norm": True,
                 "norm_eps": 1e-5, "act": "gelu", "attention_impl": "auto"},
      "llm": {"size": a.llm, "vocab_size": 0, "tie_embeddings": False,  # 0: the tokenizer's
              "attention_impl": "auto"},
      "projector": "mlp2x_gelu",
      "feature_layer": -2,
      "keep_cls": False,
      "image_posemb": bool(a.posemb),
      "merge": a.merge,
      "image_token_id": 4,  # `<image>` of our sentencepiece models
      "dtype": "float32",
      "scan": True,
      "remat": "none",
  })


def get_config(arg=None):
  a = common.parse_arg(arg, stage=2, runlocal=False, steps=0, llm="nano", num_train=6000,
                       num_eval=100, data="", clip="", lm="", stage1="", posemb=True, merge=2,
                       answers="short", existence_turns=2,
                       **clip_shapes.TOWER)
  c = common.base_config("llava")
  c.stage = a.stage
  c.model = model_config(a)
  c.data = instruct_data(a)
  c.init = ml_collections.ConfigDict({"clip_workdir": a.clip or None, "lm_workdir": a.lm or None,
                                      "stage1_workdir": a.stage1 or None})
  c.batch_size = 32
  c.log_every = 25
  c.optim.weight_decay = 0.0
  c.optim.b2 = 0.95
  c.eval.batch_size = 128
  c.eval.num_questions = 100000
  c.eval.num_captions = 256
  # restated answers run to 13 tokens ("The orange shape is to the right of the blue circle.")
  c.eval.max_new_tokens = 20 if a.answers == "restate" else 8
  if a.stage == 1:
    c.data.template = "plain"
    c.data.max_len = 48
    c.total_steps = a.steps or 200
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    c.optim.frozen = ["vision/.*", "llm/.*"]
    c.eval_at_start = True  # the caption loss with the untrained projector, at step 0
  elif a.stage == 2:
    c.total_steps = a.steps or 1200
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 25
    c.optim.frozen = ["vision/.*"]
  else:
    raise ValueError(f"stage must be 1 or 2, got {a.stage}")
  c.eval_every = c.checkpoint_every = c.total_steps
  if a.runlocal:
    c.total_steps = c.eval_every = c.checkpoint_every = 10
    c.log_every = 5
    c.batch_size = 8
    c.eval.num_questions = 32
    c.eval.num_captions = 32
    c.eval.batch_size = 32
  return c
