"""Everything that turns files into per-process batches.

  shapes.py      the embedded synthetic scenes (image, captions, boxes, scene)
  builders.py    TFDS builders (array_record) for shapes and sklearn digits; `prepare`
  sources.py     random-access example sources: a TFDS split, LLaVA JSON + image folder
  pipeline.py    grain train/eval iterators, per-process shards, data config
  transforms.py  decode, resize, crop, flip, normalise, pad-to-square
  tokenizer.py   sentencepiece and HF tokenizer.json behind one protocol
  __main__.py    python -m mmjax.data NAME [KEY=VALUE ...]: prepare ahead of a run
"""

from mmjax.data.builders import prepare
from mmjax.data.pipeline import (class_names, dataset_tokenizer, default_data_config,
                                 eval_iterator, held_out_labels, make_source, prompt_templates,
                                 train_iterator)
from mmjax.data.tokenizer import Tokenizer, load_tokenizer
from mmjax.data.transforms import preprocess_image

__all__ = [
    "Tokenizer", "class_names", "dataset_tokenizer", "default_data_config", "eval_iterator",
    "held_out_labels", "load_tokenizer", "make_source", "prepare", "preprocess_image",
    "prompt_templates", "train_iterator",
]
