"""Tokenizers trained here round-trip code and prose exactly; existing models load."""

import pytest

from lm import data
from lm.config import ConfigError, TokenizerConfig
from lm.tokenizer import Tokenizer, train

TRICKY = "def f(x):\n\tif x:\n\t\treturn  x   # two  spaces\n\n\n   trailing   \r\nnaïve café — 日本語 🙂 \\n\x00"


@pytest.fixture(scope="module")
def stdlib_docs():
  return [data.TextFiles(data.stdlib_files())[i] for i in range(0, 1500, 7)]


@pytest.mark.parametrize("model_type,vocab", [("bpe", 1024), ("unigram", 1024), ("char", 400)])
def test_round_trip_on_real_code_and_prose(model_type, vocab, stdlib_docs, shared_data, tmp_path):
  tok = train(stdlib_docs, TokenizerConfig(model_type=model_type, vocab_size=vocab, train_sentences=30000), tmp_path / "t.model")
  shakespeare = (shared_data / "tinyshakespeare.txt").read_text()
  for text in [TRICKY, shakespeare[:200_000], *stdlib_docs[:40]]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  assert tok.vocab_size <= vocab
  assert Tokenizer(tmp_path / "t.model").encode(TRICKY) == tok.encode(TRICKY)


def test_bpe_compresses_code(stdlib_docs, tmp_path):
  tok = train(stdlib_docs, TokenizerConfig(model_type="bpe", vocab_size=2048), tmp_path / "t.model")
  text = "".join(stdlib_docs[:20])
  assert len(tok.encode(text)) < len(text) / 2.5
  assert tok.sp.id_to_piece(tok.encode("\n")[0]) == "\n"


def test_existing_pretrained_model_loads(shared_data):
  tok = Tokenizer(shared_data / "c4_en_32k_sentencepiece.model")
  assert tok.vocab_size == 32101 and tok.eos_id == 1  # the T5 vocabulary
  assert tok.decode(tok.encode("The quick brown fox.")) == "The quick brown fox."


def test_errors(tmp_path):
  with pytest.raises(ConfigError, match="tokenizer.path '.*missing.model' does not exist"):
    Tokenizer(tmp_path / "missing.model")
  with pytest.raises(ConfigError, match="cannot train a bpe tokenizer with tokenizer.vocab_size=100000"):
    train(["tiny corpus\n"] * 10, TokenizerConfig(vocab_size=100000), tmp_path / "t.model")
