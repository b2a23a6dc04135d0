"""The LLaVA stage-2 train step of mmjax against transformers'
LlavaForConditionalGeneration (PyTorch) on the same model.

  python -m benchmarks.llava_step [--configs=small,tiny] [--repeats=5] [--out=FILE.json]

Stage 2: the CLIP vision tower is frozen, the projector (mlp2x_gelu) and the
Llama-style LLM train, float32, AdamW, on one fixed batch of right-padded rows
with one image each (labels on the answer tokens only). mmjax's params are
exported into the transformers model with `mmjax.convert` (the same mapping as
`python -m mmjax.convert --to=hf`) and the step-0 losses compared; the steps
are then timed alternately in one process, medians reported, as in
`benchmarks.clip_step`.
"""

from __future__ import annotations

import dataclasses

from benchmarks import common

# name -> the model and batch: "small" is tiny-but-not-trivial (a 6-layer
# width-256 tower at 112 px, 64 image tokens, a 4-layer width-512 LLM with GQA,
# 159 positions); "tiny" runs in seconds for the CI smoke test.
CONFIGS = {
    "small": dict(vision=dict(variant="custom/14", width=256, depth=6, mlp_dim=1024, num_heads=4),
                  image_size=112,
                  llm=dict(width=512, depth=4, num_heads=8, num_kv_heads=4, mlp_dim=1408,
                           vocab_size=8192),
                  max_len=96, batch=8),
    "tiny": dict(vision=dict(variant="tiny/8"), image_size=32,
                 llm=dict(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          vocab_size=256),
                 max_len=24, batch=4),
}
IMAGE_TOKEN = 4


@dataclasses.dataclass
class Options:
  scan: bool = False
  remat: str = "none"
  dtype: str = "float32"
  attention: str = "auto"  # mmjax.models.attention: auto | cpu | xla | cudnn | splash


def mmjax_config(c: dict, opts: Options, lr: float = 2e-5):
  import ml_collections

  from experiments import common as exp
  config = exp.base_config("llava")
  config.stage = 2
  config.batch_size = c["batch"]
  config.total_steps = 10_000
  config.optim.update(lr=lr, warmup_steps=0, weight_decay=0.0, clip_norm=0.0,
                      frozen=["vision/.*"])
  config.model = ml_collections.ConfigDict({
      "vision": dict(c["vision"], pool="none", pre_norm=True, norm_eps=1e-5, act="quick_gelu",
                     attention_impl=opts.attention),
      "llm": dict({"size": "custom", "rope_theta": 10000.0, "norm_eps": 1e-5,
                   "tie_embeddings": False}, **c["llm"], attention_impl=opts.attention),
      "projector": "mlp2x_gelu", "feature_layer": -2, "keep_cls": False,
      "image_token_id": IMAGE_TOKEN, "dtype": opts.dtype, "scan": opts.scan,
      "remat": opts.remat})
  config.data = ml_collections.ConfigDict({"image_size": c["image_size"],
                                           "max_len": c["max_len"], "template": "vicuna_v1",
                                           "system_prompt": None})
  return config


def build_mmjax_step(config, devices=None):
  """(jitted train step, initial state, task, mesh, rules) of the llava task."""
  from mmjax.train import tasks
  task = tasks.LLaVATask(config, with_data=False)
  train_step, state, mesh, rules = common.build_mmjax_step(config, task, devices)
  return train_step, state, task, mesh, rules


def make_batch(c: dict, seed: int = 0):
  """image [B, H, W, 3]; tokens [B, T]: BOS, `<image>`, a question, an answer,
  right padding (0); labels [B, T]: the answer tokens, -100 elsewhere."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, t, v = c["batch"], c["max_len"], c["llm"]["vocab_size"]
  image = rng.normal(size=(b, c["image_size"], c["image_size"], 3)).astype(np.float32)
  tokens = np.zeros((b, t), np.int32)
  labels = np.full((b, t), -100, np.int32)
  for i in range(b):
    n = int(rng.integers(t * 3 // 4, t + 1))  # this row's length
    q = int(rng.integers(3, n // 2))  # question end
    tokens[i, :n] = rng.integers(IMAGE_TOKEN + 1, v, n)
    tokens[i, 0], tokens[i, 1] = 1, IMAGE_TOKEN
    labels[i, q:n] = tokens[i, q:n]
  return image, tokens, labels


# --------------------------------------------------------------------------
# transformers


def hf_model(params, model_cfg):
  """LlavaForConditionalGeneration holding `params` (exported by mmjax.convert)."""
  import numpy as np
  import torch
  import transformers

  from mmjax.convert import llava as llava_conv, mapping
  hf = llava_conv.hf_config(model_cfg)
  config = transformers.LlavaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
  model = transformers.LlavaForConditionalGeneration(config)
  keys = set(model.state_dict())
  layout = llava_conv.layout(keys)
  prepared = llava_conv.prepare_export(mapping.scanned(params), model_cfg)
  tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
             mapping.export_tensors(prepared, llava_conv.rules(model_cfg, layout))}
  missing = sorted(k for k in keys - set(tensors) if not k.endswith("position_ids"))
  if missing:
    raise KeyError(f"transformers params without an mmjax source: {missing[:8]}")
  model.load_state_dict(tensors, strict=False)
  return model


def make_hf_step(model, image, tokens, labels, num_image_tokens: int, lr: float = 2e-5):
  """transformers' stage-2 step: vision tower frozen, AdamW on the rest."""
  import numpy as np
  import torch
  model.model.vision_tower.requires_grad_(False)
  model.train()
  trained = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
  # `<image>` sits at position 1 of every row (make_batch).
  ids = np.stack([np.concatenate([r[:1], np.full(num_image_tokens, IMAGE_TOKEN), r[2:]])
                  for r in tokens])
  lab = np.stack([np.concatenate([r[:1], np.full(num_image_tokens, -100), r[2:]])
                  for r in labels])
  inputs = dict(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(ids != 0).long(),
                pixel_values=torch.from_numpy(image).permute(0, 3, 1, 2).contiguous(),
                labels=torch.from_numpy(lab).long())

  def loss():
    return model(**inputs).loss

  def step():
    opt.zero_grad(set_to_none=True)
    loss().backward()
    opt.step()
    return None

  return step, loss


# --------------------------------------------------------------------------


def run_config(name: str, opts: Options, repeats: int, steps: int, warmup: int,
               peer: bool = True) -> dict:
  import jax

  c = CONFIGS[name]
  config = mmjax_config(c, opts)
  train_step, state, task, mesh, rules = build_mmjax_step(config)
  image, tokens, labels = make_batch(c)

  note, hf_step, peer_loss = "", None, None
  if peer:
    try:
      import torch
      import transformers  # noqa: F401
    except ImportError as e:
      note = f"transformers not importable ({e}); pip install -e '.[convert]' to compare"
    else:
      torch.manual_seed(0)
      model = hf_model(jax.device_get(state.params), task.model_config)
      hf_step, hf_loss = make_hf_step(model, image, tokens, labels,
                                      task.model_config.num_image_tokens)
      with torch.no_grad():
        peer_loss = float(hf_loss())
  else:
    note = "peer skipped (--no_peer)"
  if note:
    print(f"[{name}] {note}")

  r = common.time_against_peer(name, train_step, state, task,
                               {"image": image, "tokens": tokens, "labels": labels}, mesh,
                               rules, hf_step, repeats=repeats, steps=steps, warmup=warmup)
  extra = {"config": c, "mmjax_options": dataclasses.asdict(opts),
           "sequence_length": c["max_len"] - 1 + task.model_config.num_image_tokens,
           "mmjax_loss_at_step_0": r["loss_0"], "peer_loss_at_step_0": peer_loss,
           "loss_difference_at_step_0": None if peer_loss is None else abs(r["loss_0"] - peer_loss),
           "mmjax_loss_after": r["final_loss"]}
  return common.result_row(name, c["batch"], task.flops_per_example(), r["times"]["mmjax"],
                           r["times"].get("peer"), r["peaks"], "transformers", note=note,
                           extra=extra)


def main(argv=None):
  return common.step_main(
      argv, benchmark="llava_step", configs=CONFIGS, run_config=run_config, options=Options,
      title="LLaVA stage-2 train step (float32, AdamW): mmjax vs transformers, medians",
      peer="transformers")


if __name__ == "__main__":
  main()
