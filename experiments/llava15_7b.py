"""LLaVA-1.5-7B: CLIP ViT-L/14-336 (frozen), an mlp2x_gelu projector, Vicuna-7B,
for GPU / TPU. Stage 1 aligns the projector on LCS-558K captions; stage 2 tunes
projector and LLM on llava_v1_5_mix665k (hyperparameters of the LLaVA-1.5
paper's training scripts).

  python -m mmjax.train --config=experiments/llava15_7b.py:stage=1,clip=CLIP_DIR,lm=VICUNA_DIR \\
      --workdir=gs://bucket/llava15_s1 --config.data.json_path=.../blip_laion_cc_sbu_558k.json \\
      --config.data.image_folder=.../LLaVA-Pretrain/images --config.data.tokenizer=TOKENIZER
  python -m mmjax.train --config=experiments/llava15_7b.py:stage=2,stage1=gs://bucket/llava15_s1 \\
      --workdir=gs://bucket/llava15_s2 --config.data.json_path=.../llava_v1_5_mix665k.json ...

CLIP_DIR and VICUNA_DIR are workdirs of converted checkpoints (`python -m
mmjax.convert`): params/vision of a CLIP, and an LLM's params. TOKENIZER is a
tokenizer.json in which "<image>" is one added token (id 32000, as in
llava-hf/llava-1.5-7b-hf), so that each image is one placeholder id.
"""

import ml_collections

from experiments import common
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, stage=1, clip="", lm="", stage1="", runlocal=False,
                       stage1_examples=558_128, stage2_examples=665_298)
  c = common.base_config("llava")
  c.stage = a.stage
  c.model = ml_collections.ConfigDict({
      "vision": {"variant": "L/14", "pool": "none", "pre_norm": True, "norm_eps": 1e-5,
                 "act": "quick_gelu", "attention_impl": "auto"},
      # Vicuna-7B v1.5 (Llama-2-7B); HF's llava-1.5 pads the vocabulary to 32064.
      "llm": {"size": "7B", "vocab_size": 32064, "attention_impl": "auto"},
      "projector": "mlp2x_gelu",
      "feature_layer": -2,  # penultimate layer, class token dropped: 576 tokens
      "keep_cls": False,
      "image_token_id": 32000,
      "dtype": "bfloat16",
      "scan": True,
      "remat": "dots_no_batch",
  })
  c.data = default_data_config("llava")
  c.data.image_size = 336
  c.data.transforms.pad_to_square = True  # v1.5: pad with the mean colour, then resize
  c.data.template = "plain" if a.stage == 1 else "vicuna_v1"
  c.data.system_prompt = ml_collections.FieldReference(None, field_type=str)
  c.data.max_len = 2048
  c.data.num_workers = 16
  c.data.read_threads = 8
  c.data.caption_eval_json_path = None
  c.init = ml_collections.ConfigDict({"clip_workdir": a.clip or None, "lm_workdir": a.lm or None,
                                      "stage1_workdir": a.stage1 or None})
  c.mesh.data, c.mesh.fsdp = 1, -1  # ZeRO-3 style: 7B params and Adam state sharded
  c.optim.weight_decay = 0.0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.clip_norm = 1.0
  c.optim.schedule = "cosine"
  if a.stage == 1:
    c.batch_size = 256
    c.total_steps = a.stage1_examples // c.batch_size  # one epoch
    c.optim.lr = 1e-3
    c.optim.frozen = ["vision/.*", "llm/.*"]
  elif a.stage == 2:
    c.batch_size = 128
    c.total_steps = a.stage2_examples // c.batch_size
    c.optim.lr = 2e-5
    c.optim.frozen = ["vision/.*"]
  else:
    raise ValueError(f"stage must be 1 or 2, got {a.stage}")
  c.optim.warmup_steps = int(0.03 * c.total_steps)
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  # Set data.eval_json_path (single-turn questions with "answer", "question_type")
  # and eval_every to run the VQA evaluation during training.
  c.eval_every = 0
  c.eval.batch_size = 64
  c.eval.num_questions = 1000
  c.eval.num_captions = 256
  c.eval.max_new_tokens = 16
  if a.runlocal:
    c.total_steps, c.batch_size, c.log_every = 10, 8, 1
  return c
