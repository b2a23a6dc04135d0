"""Tokenizers behind one protocol: sentencepiece (train, load) and HF tokenizer.json.

Our own sentencepiece models fix the special ids: pad 0, bos 1, eos 2, unk 3,
`<image>` 4. The CLIP text tower pools at the first EOS, so EOS must be known and
distinct from padding.

  python -m mmjax.data.tokenizer train --corpus=FILE --vocab_size=N --out=PREFIX
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
IMAGE_TOKEN = "<image>"


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def encode_batch(self, texts: Sequence[str], length: int, add_bos: bool = True,
                   add_eos: bool = True) -> np.ndarray: ...


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A `.model` file -> sentencepiece; a `.json` file (or a folder holding tokenizer.json) -> HF."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("tokenizer.model", "tokenizer.json"):
      if os.path.exists(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in the folder {path}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)


class _Base:
  """Shared batch encoding; subclasses give `encode`, `decode` and the ids."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str], length: int, add_bos: bool = True,
                   add_eos: bool = True) -> np.ndarray:
    """[N, length] int32. Long texts are truncated, keeping BOS and EOS; the rest is pad_id."""
    out = np.full((len(texts), length), self.pad_id, np.int32)
    head = [self.bos_id] if add_bos else []
    tail = [self.eos_id] if add_eos else []
    room = length - len(head) - len(tail)
    if room < 0:
      raise ValueError(f"length {length} cannot hold the BOS/EOS tokens")
    for i, text in enumerate(texts):
      ids = head + self.encode(text)[:room] + tail
      out[i, :len(ids)] = ids
    return out


class SentencePieceTokenizer(_Base):
  """A sentencepiece model from a `.model` file or its serialized bytes."""

  def __init__(self, path: str | None = None, *, model_proto: bytes | None = None):
    import sentencepiece as spm
    if model_proto is None:
      with open(path, "rb") as f:
        model_proto = f.read()
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    # Models trained without a pad piece (e.g. Llama's) report -1: pad with unk
    # there, never with EOS, so that pooling at the first EOS stays right.
    pad = self._sp.pad_id()
    self.pad_id = pad if pad >= 0 else max(self._sp.unk_id(), 0)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in specials])

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      f.write(self._proto)

  # Grain worker processes receive the tokenizer by pickling: send the bytes.
  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(model_proto=state["model_proto"])


class HFTokenizer(_Base):
  """A HF `tokenizer.json` through the `tokenizers` library (imported checkpoints).

  Special ids are found by their usual names unless given; OpenAI CLIP's file
  pads with EOS, which is kept as the file says (its text tower pools by argmax).
  """

  _BOS = ("<|startoftext|>", "<s>", "<bos>", "[CLS]", "<|begin_of_text|>")
  _EOS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>", "<|eot_id|>")
  _PAD = ("<pad>", "[PAD]", "<|pad|>", "<unk>", "[UNK]")

  def __init__(self, path: str, *, bos: str | None = None, eos: str | None = None,
               pad: str | None = None):
    from tokenizers import Tokenizer as _HF
    self._path = path
    self._names = (bos, eos, pad)
    self._tok = _HF.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._find(bos, self._BOS, "BOS")
    self.eos_id = self._find(eos, self._EOS, "EOS")
    if pad is None and self._tok.padding is not None:
      self.pad_id = self._tok.padding["pad_id"]
    else:
      self.pad_id = self._find(pad, self._PAD, "pad", default=self.eos_id)

  def _find(self, name, candidates, what, default=None) -> int:
    for cand in ([name] if name else candidates):
      idx = self._tok.token_to_id(cand)
      if idx is not None:
        return idx
    if default is not None:
      return default
    raise ValueError(f"{self._path}: no {what} token among {list(candidates)}; "
                     f"pass {what.lower()}=... naming it")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self):
    return {"path": self._path, "names": self._names}

  def __setstate__(self, state):
    bos, eos, pad = state["names"]
    self.__init__(state["path"], bos=bos, eos=eos, pad=pad)


def train_sentencepiece(sentences: Iterable[str], vocab_size: int,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a deterministic sentencepiece model in memory.

  `vocab_size` is a target: raised to hold the 256 byte pieces and every
  character, an upper bound where a small corpus cannot fill it. Byte fallback
  keeps any character encodable, and digits are split so that box
  coordinates tokenise the same way everywhere.
  """
  import sentencepiece as spm
  sentences = [s for s in sentences if s.strip()]
  if not sentences:
    raise ValueError("cannot train a tokenizer on an empty corpus")
  # Byte fallback needs 256 byte pieces beside the characters and the specials.
  min_size = 256 + len(set("".join(sentences))) + 5
  vocab_size = max(vocab_size, min_size)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
      model_type=model_type, hard_vocab_limit=False, byte_fallback=True,
      character_coverage=1.0, split_digits=True,
      # Identity normalisation keeps the text exactly (newlines go through
      # byte fallback), so decode(encode(x)) == x.
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      user_defined_symbols=[IMAGE_TOKEN],
      # One thread and no sampling: the same corpus gives the same model.
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      minloglevel=2)
  return SentencePieceTokenizer(model_proto=buf.getvalue())


def _main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m mmjax.data.tokenizer")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a sentencepiece model on a text file")
  train.add_argument("--corpus", required=True, help="text file, one sentence a line")
  train.add_argument("--vocab_size", type=int, default=1000)
  train.add_argument("--model_type", default="bpe", choices=["unigram", "bpe", "word", "char"])
  train.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
  enc = sub.add_parser("encode", help="print the ids and pieces of a text")
  enc.add_argument("--model", required=True)
  enc.add_argument("text")
  args = parser.parse_args(argv)
  if args.command == "train":
    if not os.path.exists(args.corpus):
      parser.error(f"corpus file not found: {args.corpus}")
    with open(args.corpus, encoding="utf-8") as f:
      tok = train_sentencepiece(f.read().splitlines(), args.vocab_size, args.model_type)
    tok.save(args.out + ".model")
    print(f"wrote {args.out}.model (vocab {tok.vocab_size})")
  else:
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text)
    print(ids)
    print(repr(tok.decode(ids)))


if __name__ == "__main__":
  _main()
