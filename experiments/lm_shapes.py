"""Pretrain the tiny decoder LM on the text of the generated shapes data
(captions, questions and answers, no images): the LLM that LLaVA stage 1 aligns
to, since no pretrained LLM can be downloaded here.

  python -m mmjax.train --config=experiments/lm_shapes.py --workdir=DIR/lm
"""

from experiments import clip_shapes, common, llava_shapes


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, steps=300, llm="nano", num_train=6000, num_eval=100,
                       data="", image_size=clip_shapes.TOWER["image_size"], answers="short",
                       existence_turns=2)
  c = common.base_config("lm")
  c.total_steps = a.steps
  c.batch_size = 32
  c.log_every = 25
  c.eval_every = c.checkpoint_every = a.steps
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.95
  llava = llava_shapes.model_config(
      common.parse_arg(None, llm=a.llm, posemb=False, merge=1, **clip_shapes.TOWER))
  c.model = {k: llava[k] for k in ("llm", "dtype", "scan", "remat")}  # the LLaVA's own LLM
  c.data = llava_shapes.instruct_data(a)
  # Each file's share of the documents (mmjax.train.tasks.llava.LMTask):
  # --config.data.lm_weights.grounded=3 repeats the described scenes 3 times.
  c.data.lm_weights = {"captions": 1.0, "instruct": 1.0, "grounded": 1.0}
  c.eval.batch_size = 32
  if a.runlocal:
    c.total_steps = c.eval_every = c.checkpoint_every = 10
    c.log_every = 5
    c.batch_size = 8
  return c
