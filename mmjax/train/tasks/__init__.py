"""One Task per model family, on the shared step and loop.

  base.py    the Task protocol, the registry (`register`, `build_task`) and the
             helpers every family uses
  clip.py    "clip": contrastive image-text pretraining (CLIP, SigLIP)
  vit.py     "vit", "convnet", "mae": classification, distillation, MAE
  llava.py   "lm", "llava": decoder LM pretraining; LLaVA stages 1 and 2

`build_task(config)` returns the Task named by `config.task`.
"""

from mmjax.train.tasks.base import TASKS, Task, build_task, register  # noqa: F401
from mmjax.train.tasks import clip, llava, vit  # noqa: F401,E402  (they register)
from mmjax.train.tasks.clip import CLIPTask, token_ids  # noqa: F401,E402
from mmjax.train.tasks.llava import LLaVATask, LMTask  # noqa: F401,E402
from mmjax.train.tasks.vit import ConvNetTask, MAETask, ViTTask  # noqa: F401,E402
