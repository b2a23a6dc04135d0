"""CLIP ViT-B/16 (open_clip sizes) on a TFDS image-text dataset, for GPU / TPU.

Prepare the dataset as array_record first (e.g. `tfds build coco_captions
--file_format=array_record`), then:

  python -m mmjax.train --config=experiments/clip_vit_b16.py:data=coco_captions \
      --workdir=gs://bucket/clip_b16 --config.mesh.fsdp=8
"""

from experiments import common
from mmjax.data.pipeline import default_data_config


def get_config(arg=None):
  a = common.parse_arg(arg, data="coco_captions", image_key="image", text_key="captions/text",
                       steps=100_000, batch=32768, variant="B/16", text="B", embed=512,
                       loss="softmax", runlocal=False)
  c = common.base_config("clip")
  c.init = common.clip_init()
  c.total_steps = a.steps
  c.batch_size = a.batch
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.mesh.data, c.mesh.fsdp = -1, 1
  # open_clip's recipe: lr 5e-4 at batch 32k, beta2 0.98, eps 1e-6, wd 0.2, 10k warmup.
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 10_000
  c.optim.weight_decay = 0.2
  c.model = common.clip_model(a.variant, a.text, a.embed, loss=a.loss, dtype="bfloat16",
                              remat="dots_no_batch")
  c.data = default_data_config(a.data)
  c.data.image_size = 224
  c.data.context_length = 77
  c.data.image_key, c.data.text_key = a.image_key, a.text_key
  c.data.transforms.random_resized_crop = True
  c.data.transforms.crop_scale = (0.9, 1.0)
  c.data.num_workers = 16
  c.eval.batch_size = 1024
  c.eval.zeroshot = False  # set data.label_key / a classification eval_split to enable
  if a.runlocal:
    c.total_steps, c.batch_size, c.log_every = 10, 64, 1
  return c
