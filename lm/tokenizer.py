"""SentencePiece tokenizers: load an existing model or train one that round-trips code and prose."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lm.config import ConfigError, TokenizerConfig
from lm.files import write_file


def file_digest(path: str | Path) -> str:
  """A tokenizer file's SHA-256, as checkpoints and token caches record it."""
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Tokenizer:
  def __init__(self, path: str | Path):
    path = Path(path).expanduser()
    if not path.is_file():
      raise ConfigError(f"tokenizer.path '{path}' does not exist; point it at a sentencepiece .model or leave it empty to train one")
    self.path = path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError:
      raise ConfigError(f"tokenizer '{path}' is not a sentencepiece .model file") from None

  @property
  def sha256(self) -> str:
    return file_digest(self.path)

  def __getstate__(self) -> dict:
    return {"path": self.path}  # worker processes load the model again

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"])

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode(list(ids))


def _lines(docs: Iterable[str], limit: int) -> Iterator[str]:
  count = 0
  for doc in docs:
    for line in doc.splitlines():
      if line.strip():
        yield line
        count += 1
        if count >= limit:
          return


class _Reading:
  """An iterator that keeps the error which stopped it: sentencepiece would turn that into the text
  of a RuntimeError of its own."""

  def __init__(self, lines: Iterable[str]):
    self.lines, self.error = iter(lines), None

  def __iter__(self) -> "_Reading":
    return self

  def __next__(self) -> str:
    try:
      return next(self.lines)
    except ConfigError as e:  # a bad document: the user's error, not the trainer's
      self.error = e
      raise


def check_trained_as(tokenizer: Tokenizer, cfg: TokenizerConfig, where: str = "--workdir") -> None:
  """Fails where a tokenizer trained earlier in this work directory (`where`) was trained with other settings."""
  spec = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.sp.serialized_model_proto()).trainer_spec
  model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower()
  size_differs = spec.vocab_size > cfg.vocab_size if model_type == "char" else spec.vocab_size != cfg.vocab_size
  if model_type != cfg.model_type or size_differs:
    raise ConfigError(f"{tokenizer.path} was trained as a {model_type} tokenizer of {spec.vocab_size} pieces, not with "
                      f"tokenizer.model_type={cfg.model_type} tokenizer.vocab_size={cfg.vocab_size}; delete it to train "
                      f"another, or use a new {where}")


SPECIAL_PIECES = 3 + 2  # <unk> <s> </s>, then newline and tab
BYTE_PIECES = 256  # byte fallback


def train(docs: Iterable[str], cfg: TokenizerConfig, path: str | Path) -> Tokenizer:
  """Trains on the documents' lines. Identity normalization, kept whitespace and byte fallback make
  `decode(encode(text)) == text` for any text; newline and tab are pieces of their own. A char
  vocabulary is sized to the text's characters, with `tokenizer.vocab_size` as its upper bound."""
  lines = _lines(docs, cfg.train_sentences)
  vocab_size = cfg.vocab_size
  if cfg.model_type == "char":
    lines = list(lines)
    vocab_size = len(set().union(*lines)) + BYTE_PIECES + SPECIAL_PIECES  # at least what sentencepiece keeps
  model, reading = io.BytesIO(), _Reading(lines)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=reading, model_writer=model,
        model_type=cfg.model_type, vocab_size=vocab_size, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True,
        user_defined_symbols=["\n", "\t"], hard_vocab_limit=cfg.model_type != "char",
        max_sentence_length=16384, num_threads=4, minloglevel=2)
  except RuntimeError as e:
    if reading.error is not None:
      raise reading.error from None
    raise ConfigError(f"cannot train a {cfg.model_type} tokenizer with tokenizer.vocab_size={cfg.vocab_size}: {str(e).strip().splitlines()[-1]}") from None
  trained = spm.SentencePieceProcessor(model_proto=model.getvalue())
  if trained.vocab_size() > cfg.vocab_size:
    raise ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for a char tokenizer of this text: its "
                      f"{trained.vocab_size() - BYTE_PIECES - SPECIAL_PIECES} characters, {BYTE_PIECES} byte-fallback and "
                      f"{SPECIAL_PIECES} special pieces need tokenizer.vocab_size={trained.vocab_size()} or more")
  write_file(Path(path), model.getvalue())
  return Tokenizer(path)
