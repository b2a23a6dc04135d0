"""Tokenizers: sentencepiece (trained here) and HF tokenizer.json, one protocol."""

import pickle

import numpy as np
import pytest

from mmjax.data import tokenizer as tok_lib

CORPUS = [
    "a red circle above a small blue square",
    "two objects: a large green star and a yellow triangle",
    "a photo of one purple diamond.",
    "how many shapes are there? there are three shapes.",
    "is the orange cross to the left of the pink circle? yes.",
    "red circle: [0.12, 0.30, 0.41, 0.62]",
] * 20


@pytest.fixture(scope="module")
def sp():
  return tok_lib.train_sentencepiece(CORPUS, vocab_size=400)


def test_special_ids_are_fixed(sp):
  assert (sp.pad_id, sp.bos_id, sp.eos_id) == (tok_lib.PAD_ID, tok_lib.BOS_ID, tok_lib.EOS_ID)
  assert sp.pad_id != sp.eos_id
  assert sp.piece_to_id(tok_lib.IMAGE_TOKEN) == 4
  assert isinstance(sp, tok_lib.Tokenizer)


def test_round_trip(sp):
  unseen = ["unseen words: zebra, 42 and ünïcödé 🙂", "two  spaces\nnew line"]
  for text in CORPUS[:6] + unseen:
    ids = sp.encode(text)
    assert all(0 <= i < sp.vocab_size for i in ids)
    assert sp.decode(ids) == text


def test_encode_batch_pads_and_truncates_keeping_eos(sp):
  long = " ".join(CORPUS[:6])
  short_ids = sp.encode("a red circle")
  n = len(short_ids) + 2
  length = n + 4
  out = sp.encode_batch(["a red circle", long], length=length)
  assert out.dtype == np.int32 and out.shape == (2, length)
  np.testing.assert_array_equal(out[0, :n], [sp.bos_id] + short_ids + [sp.eos_id])
  assert (out[0, n:] == sp.pad_id).all()
  # Truncated, never dropped: BOS first, EOS last, the text's head between.
  assert out[1, 0] == sp.bos_id and out[1, -1] == sp.eos_id
  np.testing.assert_array_equal(out[1, 1:-1], sp.encode(long)[:length - 2])
  no_bos = sp.encode_batch(["a red circle"], length=length, add_bos=False)
  np.testing.assert_array_equal(no_bos[0, :n - 1], short_ids + [sp.eos_id])
  with pytest.raises(ValueError):
    sp.encode_batch(["x"], length=1)


def test_training_is_deterministic(sp):
  again = tok_lib.train_sentencepiece(CORPUS, vocab_size=400)
  assert again._proto == sp._proto


def test_pickles_for_worker_processes(sp):
  clone = pickle.loads(pickle.dumps(sp))
  assert clone.encode(CORPUS[0]) == sp.encode(CORPUS[0])


def test_cli_trains_and_loads(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(CORPUS))
  prefix = str(tmp_path / "tokenizer")
  tok_lib._main(["train", f"--corpus={corpus}", "--vocab_size=200", f"--out={prefix}"])
  loaded = tok_lib.load_tokenizer(prefix + ".model")
  assert isinstance(loaded, tok_lib.SentencePieceTokenizer)
  assert loaded.decode(loaded.encode(CORPUS[1])) == CORPUS[1]
  assert tok_lib.load_tokenizer(tmp_path).vocab_size == loaded.vocab_size  # folder -> .model


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  hf = Tokenizer(models.WordLevel(unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.train_from_iterator(CORPUS, trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))
  tok = tok_lib.load_tokenizer(path)
  assert isinstance(tok, tok_lib.HFTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  ids = tok.encode("a red circle")
  assert tok.decode(ids) == "a red circle"
  out = tok.encode_batch(["a red circle"], length=8)
  np.testing.assert_array_equal(out[0], [1] + ids + [2] + [0] * (8 - len(ids) - 2))
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("a blue square") == tok.encode("a blue square")


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.load_tokenizer(tmp_path / "nope.model")
