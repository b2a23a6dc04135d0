"""The CLIP train step of mmjax against open_clip's (PyTorch) on the same model.

  python -m benchmarks.clip_step [--configs=small,tiny] [--repeats=5] [--out=FILE.json]

Both frameworks train the same model (widths, depths, heads, patch and image
size, context length, exact GELU, pre-LN, no projection biases, argmax text
pooling), float32, AdamW, on one fixed batch. mmjax's step is the library's
(`mmjax.train.step`, jitted with donated state); open_clip's is its training
loop's (forward, ClipLoss, backward, AdamW, logit-scale clamp). mmjax's params
are copied into the open_clip model first and the step-0 losses compared. The
two steps are timed alternately in one process after a warm-up, and each
repeat also probes the host's float32 matmul peak; medians are reported.

open_clip needs torch 2.14.1 + torchvision 0.29.1 (the `bench` extra, in its
own environment; docs/performance.md). Without it the peer is skipped and
its numbers are null.
"""

from __future__ import annotations

import dataclasses
import math

from benchmarks import common

# name -> the model and batch. "small": ViT-S/16 at 224 px with a 6 x 384 text
# tower; "tiny": seconds, for the CI smoke test.
CONFIGS = {
    "small": dict(vision="S/16", image_size=224, text="S", embed_dim=384, context_length=77,
                  vocab_size=49408, batch=32),
    "tiny": dict(vision="tiny/8", image_size=32, text="tiny", embed_dim=32, context_length=16,
                 vocab_size=1000, batch=8),
}


@dataclasses.dataclass
class Options:
  """mmjax's knobs the benchmark can vary."""
  scan: bool = False
  remat: str = "none"
  dtype: str = "float32"
  attention: str = "auto"  # mmjax.models.attention: auto | cpu | xla | cudnn | splash


def mmjax_config(c: dict, opts: Options, lr: float = 5e-4):
  """The experiment config of configuration `c` (task "clip", no dataset)."""
  import ml_collections

  from experiments import common as exp
  config = exp.base_config("clip")
  config.batch_size = c["batch"]
  config.total_steps = 10_000
  config.optim.update(lr=lr, warmup_steps=0, weight_decay=0.2, clip_norm=0.0)
  config.model = exp.clip_model(c["vision"], c["text"], c["embed_dim"], scan=opts.scan,
                                remat=opts.remat, dtype=opts.dtype)
  config.model.vision.attention_impl = config.model.text.attention_impl = opts.attention
  config.model.text.vocab_size = c["vocab_size"]
  config.model.text.pool = "argmax"  # open_clip pools at the largest id (EOT)
  config.data = ml_collections.ConfigDict({"image_size": c["image_size"],
                                           "context_length": c["context_length"]})
  return config


def build_mmjax_step(config, devices=None):
  """(jitted train step, initial state, task, mesh, rules) of the clip task."""
  from mmjax.train import tasks
  task = tasks.CLIPTask(config, with_data=False)
  train_step, state, mesh, rules = common.build_mmjax_step(config, task, devices)
  return train_step, state, task, mesh, rules


def make_batch(c: dict, seed: int = 0):
  """Images [B, H, W, 3] and ids [B, T]: random tokens, then the EOT (the largest
  id) at a random position, zeros after it, as a tokenizer pads."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, t, v = c["batch"], c["context_length"], c["vocab_size"]
  images = rng.normal(size=(b, c["image_size"], c["image_size"], 3)).astype(np.float32)
  ids = rng.integers(1, v - 1, (b, t)).astype(np.int32)
  ends = rng.integers(t // 4, t, b)
  for i, e in enumerate(ends):
    ids[i, e] = v - 1
    ids[i, e + 1:] = 0
  return images, ids


def device_batch(c: dict, mesh, seed: int = 0) -> dict:
  """make_batch's images and ids on the mesh, split along its batch axes."""
  import jax

  from mmjax import parallel
  images, ids = make_batch(c, seed)
  return jax.device_put({"image": images, "text": ids},
                        {"image": parallel.batch_sharding(mesh, 4),
                         "text": parallel.batch_sharding(mesh, 2)})


# --------------------------------------------------------------------------
# open_clip


def open_clip_model(c: dict):
  import open_clip
  from mmjax.models.text import TEXT_SIZES
  from mmjax.models.vit import decode_variant
  v = decode_variant(c["vision"])
  width_t, depth_t, heads_t = TEXT_SIZES[c["text"]]
  heads_v = v["width"] // v["num_heads"]
  return open_clip.CLIP(
      embed_dim=c["embed_dim"],
      vision_cfg=dict(layers=v["depth"], width=v["width"], head_width=heads_v,
                      mlp_ratio=v["mlp_dim"] / v["width"], patch_size=v["patch_size"],
                      image_size=c["image_size"]),
      text_cfg=dict(context_length=c["context_length"], vocab_size=c["vocab_size"],
                    width=width_t, heads=heads_t, layers=depth_t, mlp_ratio=4.0),
      quick_gelu=False, output_dict=True)


def open_clip_state_dict(params, model) -> dict:
  """mmjax CLIP params (scanned) -> the open_clip model's state dict."""
  import numpy as np
  import torch

  from mmjax.convert import clip as clip_conv, mapping
  params = mapping.scanned(params)
  p = dict(params, vision=clip_conv.fold_patch_bias(params["vision"]))  # conv1 has no bias
  a = lambda x: np.asarray(x, np.float32)  # noqa: E731
  out = {}

  def blocks(prefix: str, enc: dict):
    b = enc["layers"]["block"]
    depth = b["norm1"]["scale"].shape[0]
    for i in range(depth):
      q, k, v = (b["attn"][n] for n in ("query", "key", "value"))
      d = q["kernel"].shape[1]
      r = f"{prefix}.resblocks.{i}"
      out[f"{r}.ln_1.weight"], out[f"{r}.ln_1.bias"] = a(b["norm1"]["scale"][i]), a(b["norm1"]["bias"][i])
      out[f"{r}.attn.in_proj_weight"] = np.concatenate(
          [a(x["kernel"][i]).reshape(d, d).T for x in (q, k, v)])
      out[f"{r}.attn.in_proj_bias"] = np.concatenate([a(x["bias"][i]).reshape(d) for x in (q, k, v)])
      out[f"{r}.attn.out_proj.weight"] = a(b["attn"]["out"]["kernel"][i]).reshape(d, d).T
      out[f"{r}.attn.out_proj.bias"] = a(b["attn"]["out"]["bias"][i])
      out[f"{r}.ln_2.weight"], out[f"{r}.ln_2.bias"] = a(b["norm2"]["scale"][i]), a(b["norm2"]["bias"][i])
      for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
        out[f"{r}.mlp.{theirs}.weight"] = a(b["mlp"][ours]["kernel"][i]).T
        out[f"{r}.mlp.{theirs}.bias"] = a(b["mlp"][ours]["bias"][i])

  v = p["vision"]
  kernel = a(v["patch_embed"]["kernel"])
  patch = int(round(math.sqrt(kernel.shape[0] / 3)))
  out["visual.conv1.weight"] = kernel.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1)
  out["visual.class_embedding"] = a(v["cls_token"])[0]
  out["visual.positional_embedding"] = a(v["pos_embed"])
  out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = a(v["pre_norm"]["scale"]), a(v["pre_norm"]["bias"])
  blocks("visual.transformer", v["encoder"])
  out["visual.ln_post.weight"], out["visual.ln_post.bias"] = a(v["final_norm"]["scale"]), a(v["final_norm"]["bias"])
  out["visual.proj"] = a(p["image_proj"]["kernel"])
  t = p["text"]
  out["token_embedding.weight"] = a(t["token_embed"]["embedding"])
  out["positional_embedding"] = a(t["pos_embed"])
  blocks("transformer", t["encoder"])
  out["ln_final.weight"], out["ln_final.bias"] = a(t["final_norm"]["scale"]), a(t["final_norm"]["bias"])
  proj = a(p["text_proj"]["kernel"])
  out["text_projection" + (".weight" if isinstance(model.text_projection, torch.nn.Linear)
                           else "")] = proj.T if isinstance(model.text_projection,
                                                            torch.nn.Linear) else proj
  out["logit_scale"] = a(p["log_scale"])
  sd = {k: torch.from_numpy(np.array(x, np.float32)) for k, x in out.items()}
  missing = sorted(set(model.state_dict()) - set(sd) - {"attn_mask"})
  if missing:
    raise KeyError(f"open_clip params without an mmjax source: {missing}")
  return sd


def make_open_clip_step(model, images, ids, lr: float = 5e-4):
  """open_clip's training step as its training loop runs it: AdamW with weight
  decay on matrices, the symmetric InfoNCE loss, the logit-scale clamp."""
  import torch
  from open_clip.loss import ClipLoss
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, betas=(0.9, 0.98), eps=1e-6)
  loss_fn = ClipLoss()
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW
  ids = torch.from_numpy(ids).long()
  model.train()

  def loss():
    out = model(images, ids)
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

  def step():
    opt.zero_grad(set_to_none=True)
    total = loss()
    total.backward()
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    return None

  return step, loss


# --------------------------------------------------------------------------


def run_config(name: str, opts: Options, repeats: int, steps: int, warmup: int,
               peer: bool = True) -> dict:
  import jax

  c = CONFIGS[name]
  config = mmjax_config(c, opts)
  train_step, state, task, mesh, rules = build_mmjax_step(config)
  images, ids = make_batch(c)

  note, torch_step, peer_loss = "", None, None
  if peer:
    try:
      import open_clip  # noqa: F401
      import torch
    except ImportError as e:
      note = (f"open_clip not importable ({e}); install the bench extra with torch 2.14.1 + "
              f"torchvision 0.29.1 (docs/performance.md) to compare")
    else:
      torch.manual_seed(0)
      model = open_clip_model(c)
      model.load_state_dict(open_clip_state_dict(jax.device_get(state.params), model),
                            strict=False)
      torch_step, torch_loss = make_open_clip_step(model, images, ids)
      with torch.no_grad():
        peer_loss = float(torch_loss())
  else:
    note = "peer skipped (--no_peer)"
  if not peer or torch_step is None:
    print(f"[{name}] {note}")

  r = common.time_against_peer(name, train_step, state, task, {"image": images, "text": ids},
                               mesh, rules, torch_step, repeats=repeats, steps=steps,
                               warmup=warmup)
  extra = {"config": c, "mmjax_options": dataclasses.asdict(opts),
           "mmjax_loss_at_step_0": r["loss_0"],
           "peer_loss_at_step_0": peer_loss,
           "loss_difference_at_step_0": None if peer_loss is None else abs(r["loss_0"] - peer_loss),
           "mmjax_loss_after": r["final_loss"]}
  return common.result_row(name, c["batch"], task.flops_per_example(), r["times"]["mmjax"],
                           r["times"].get("peer"), r["peaks"], "open_clip", note=note,
                           extra=extra)


def main(argv=None):
  return common.step_main(
      argv, benchmark="clip_step", configs=CONFIGS, run_config=run_config, options=Options,
      title="CLIP train step (float32, AdamW): mmjax vs open_clip, medians", peer="open_clip")


if __name__ == "__main__":
  main()
