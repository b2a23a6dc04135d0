"""The text and image preprocessing of an mmjax run, as transformers files.

An export writes, beside the weights:
- `tokenizer.json` (the `tokenizers` library's format) that encodes every
  text to the ids mmjax's own tokenizer gives, BOS and EOS added, with
  `tokenizer_config.json` naming the special tokens and the context length, so
  `AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
  truncation=True)` gives the [N, context_length] ids of mmjax's
  `Tokenizer.encode_batch`. A sentencepiece model (every dataset mmjax
  prepares has one) is converted; a `tokenizer.json` is used as it is.
- `preprocessor_config.json` for `CLIPImageProcessor`: resize the shorter side
  (bicubic), centre crop, rescale and normalise as `mmjax.data.transforms`
  does for evaluation.

Ids can be moved: transformers' CLIP text tower reads `eos_token_id == 2` as
"pool at the largest id" (checkpoints from before the field existed), so a
tokenizer whose EOS is 2 (mmjax's sentencepiece models) is exported with EOS
and the last id swapped (`swap_ids`), and the embedding rows with them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmjax.convert.mapping import ConversionError
from mmjax.data import tokenizer as tokenizer_lib, transforms

TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "tokenizer.model"

# data.transforms.normalize -> (image_mean, image_std) of a CLIPImageProcessor.
NORMALIZATION = {"clip": (list(transforms.CLIP_MEAN), list(transforms.CLIP_STD)),
                 "minus_one_one": ([0.5] * 3, [0.5] * 3),
                 "zero_one": ([0.0] * 3, [1.0] * 3)}


def from_sentencepiece(path: str) -> dict[str, Any]:
  """The tokenizer.json dict of a sentencepiece model: the same pieces, ids,
  normalisation and byte fallback (transformers' converter reads the model's
  own settings), BOS and EOS added around every text."""
  from sentencepiece import sentencepiece_model_pb2
  from transformers.convert_slow_tokenizer import SpmConverter
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise ConversionError(f"{path}: only BPE sentencepiece models convert to tokenizer.json "
                          f"(this one is model_type {proto.trainer_spec.model_type})")
  vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
  tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  # The control pieces (<pad>, <s>, </s>) and <unk> are special tokens, as
  # transformers registers them anyway: a text holding one literally is the one
  # place the two tokenizers differ (sentencepiece spells it out). User-defined
  # pieces (<image>) are split off by the converter's pre-tokenizer, as
  # sentencepiece does, with no dummy prefix after them.
  from tokenizers import AddedToken
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in proto.pieces if p.type in (2, 3)])
  spm = tokenizer_lib.SentencePieceTokenizer(path)
  data = json.loads(tok.to_str())
  data["post_processor"] = bos_eos_template(proto.pieces[spm.bos_id].piece, spm.bos_id,
                                             proto.pieces[spm.eos_id].piece, spm.eos_id)
  return data


def bos_eos_template(bos: str, bos_id: int, eos: str, eos_id: int) -> dict[str, Any]:
  return {"type": "TemplateProcessing",
          "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}],
          "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"Sequence": {"id": "B", "type_id": 1}},
                   {"SpecialToken": {"id": eos, "type_id": 0}}],
          "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]},
                             eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}}


def swap_ids(data: dict[str, Any], a: int, b: int) -> dict[str, Any]:
  """tokenizer.json `data` with ids `a` and `b` exchanged everywhere (the
  vocabulary, the added tokens, the post-processor, the padding)."""
  data = json.loads(json.dumps(data))
  swap = {a: b, b: a}
  sw = lambda i: swap.get(i, i)  # noqa: E731
  model = data["model"]
  vocab = model.get("vocab")
  if isinstance(vocab, dict):
    model["vocab"] = {t: sw(i) for t, i in vocab.items()}
  elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
    vocab[a], vocab[b] = vocab[b], vocab[a]
    if model.get("unk_id") is not None:
      model["unk_id"] = sw(model["unk_id"])
  else:
    raise ConversionError(f"tokenizer.json model {model.get('type')!r}: no vocabulary to reorder")
  for token in data.get("added_tokens") or []:
    token["id"] = sw(token["id"])
  post = data.get("post_processor") or {}
  for processor in [post, *post.get("processors", [])]:
    for special in (processor.get("special_tokens") or {}).values():
      special["ids"] = [sw(i) for i in special["ids"]]
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
      if isinstance(processor.get(key), list):
        processor[key][1] = sw(processor[key][1])
  if data.get("padding"):
    data["padding"]["pad_id"] = sw(data["padding"]["pad_id"])
  return data


def token_name(data: dict[str, Any], token_id: int) -> str:
  """The token string of `token_id` in tokenizer.json `data`."""
  for token in data.get("added_tokens") or []:
    if token["id"] == token_id:
      return token["content"]
  vocab = data["model"]["vocab"]
  if isinstance(vocab, dict):
    for token, i in vocab.items():
      if i == token_id:
        return token
  elif token_id < len(vocab):
    return vocab[token_id][0]
  raise ConversionError(f"tokenizer.json has no token with id {token_id}")


def write(out: str, data: dict[str, Any], *, bos_id: int, eos_id: int, pad_id: int,
          context_length: int) -> None:
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out`."""
  specials = {"bos_token": token_name(data, bos_id), "eos_token": token_name(data, eos_id),
              "pad_token": token_name(data, pad_id)}
  unk = data["model"].get("unk_token")
  if unk:
    specials["unk_token"] = unk
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, TOKENIZER_JSON), "w") as f:
    json.dump(data, f, ensure_ascii=False)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
            "padding_side": "right", "truncation_side": "right", "add_bos_token": False,
            "add_eos_token": False, "clean_up_tokenization_spaces": False, **specials}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)


def preprocessor_config(image_size: int, normalize: str) -> dict[str, Any]:
  """A CLIPImageProcessor's config that prepares images as mmjax's evaluation
  does (`transforms.preprocess_image`)."""
  if normalize not in NORMALIZATION:
    raise ConversionError(f"data.transforms.normalize={normalize!r} has no image processor "
                          f"equivalent; known: {sorted(NORMALIZATION)}")
  mean, std = NORMALIZATION[normalize]
  return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
          "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image_size},
          "resample": 3, "do_center_crop": True,
          "crop_size": {"height": image_size, "width": image_size},
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": mean, "image_std": std}
