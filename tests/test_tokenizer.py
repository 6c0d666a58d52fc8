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
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')  # a Hugging Face tokenizer
  with pytest.raises(ConfigError, match="^tokenizer '.*tokenizer.json' is not a sentencepiece .model file$"):
    Tokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(ConfigError, match="cannot train a bpe tokenizer with tokenizer.vocab_size=100000"):
    train(["tiny corpus\n"] * 10, TokenizerConfig(vocab_size=100000), tmp_path / "t.model")


def test_a_bad_document_met_while_training_is_its_own_error(tmp_path):
  def documents():
    yield "def f(x):\n    return x\n" * 50
    raise ConfigError("bad.jsonl:3: malformed JSON (Expecting value)")  # what the data reader raises

  with pytest.raises(ConfigError, match=r"^bad.jsonl:3: malformed JSON \(Expecting value\)$"):
    train(documents(), TokenizerConfig(vocab_size=300), tmp_path / "t.model")


def test_char_vocabulary_takes_the_text_s_size_and_names_the_smallest_that_works(shared_data, tmp_path):
  text = (shared_data / "tinyshakespeare.txt").read_text()  # 65 characters: the classic char-level setup
  with pytest.raises(ConfigError, match=r"^tokenizer.vocab_size=70 is too small for a char tokenizer of this text: its \d+ "
                                        r"characters, 256 byte-fallback and 5 special pieces need tokenizer.vocab_size=\d+ or more$") as e:
    train([text], TokenizerConfig(model_type="char", vocab_size=70), tmp_path / "t.model")
  smallest = int(str(e.value).split("=")[-1].split()[0])
  with pytest.raises(ConfigError, match=f"need tokenizer.vocab_size={smallest} or more"):
    train([text], TokenizerConfig(model_type="char", vocab_size=smallest - 1), tmp_path / "t.model")
  for bound in (smallest, 4096):  # the vocabulary is the text's, whatever the bound above it
    tok = train([text], TokenizerConfig(model_type="char", vocab_size=bound), tmp_path / "t.model")
    assert tok.vocab_size == smallest and tok.decode(tok.encode(text[:20000])) == text[:20000]
