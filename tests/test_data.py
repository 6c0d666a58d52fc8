"""Sources, splits and packed grain pipelines on files the tests write."""

import json

import numpy as np
import pytest

from lm import data
from lm.config import ConfigError, DataConfig



def write_docs(folder, n=40):
  folder.mkdir(exist_ok=True)
  texts = [f"document {i}\n" + "word " * (i % 13 + 1) + f"\nend {i}\n" for i in range(n)]
  for i, t in enumerate(texts):
    (folder / f"doc{i:03d}.txt").write_text(t)
  return texts


def test_text_glob_jsonl_and_arrayrecord_sources(tmp_path):
  texts = write_docs(tmp_path / "txt", 5)
  assert [data.open_source(str(tmp_path / "txt" / "*.txt"))[i] for i in range(5)] == texts
  assert len(data.open_source(str(tmp_path / "txt"))) == 5  # a directory means every file in it

  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
  source = data.open_source(f"jsonl:{jsonl}", text_field="body")
  assert [source[i] for i in range(len(source))] == texts

  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
  for t in texts:
    writer.write(t.encode())
  writer.close()
  source = data.open_source(f"arrayrecord:{tmp_path}/*.array_record")
  assert [source[i] for i in range(len(source))] == texts


def test_source_errors_name_the_problem(tmp_path):
  with pytest.raises(ConfigError, match="data source '.*nothing/\\*.txt' matched no files"):
    data.open_source(str(tmp_path / "nothing" / "*.txt"))
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ConfigError, match="data source '.*empty.txt' has no text"):
    data.open_source(str(tmp_path / "empty.txt"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": broken\n')
  source = data.open_source(f"jsonl:{bad}")
  with pytest.raises(ConfigError, match="bad.jsonl:2: malformed JSON"):
    source[1]
  with pytest.raises(ConfigError, match="bad.jsonl:1: no string field 'body'"):
    data.open_source(f"jsonl:{bad}", text_field="body")


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
  texts = write_docs(tmp_path / "txt", 40)
  cfg = DataConfig(source=str(tmp_path / "txt"), val_fraction=0.1)
  train_docs, val_docs = data.split(cfg)
  train_set = {train_docs[i] for i in range(len(train_docs))}
  val_set = {val_docs[i] for i in range(len(val_docs))}
  assert len(val_set) == 4 and not train_set & val_set and train_set | val_set == set(texts)
  again = data.split(cfg)[1]
  assert [again[i] for i in range(4)] == [val_docs[i] for i in range(4)]
  assert data.split(DataConfig(source=str(tmp_path / "txt"), val_fraction=0.0))[1] is None


def test_single_long_text_holds_out_its_tail(shared_data):
  text = (shared_data / "tinyshakespeare.txt").read_text()
  train_docs, val_docs = data.split(DataConfig(source=str(shared_data / "tinyshakespeare.txt"), val_fraction=0.1))
  assert "".join(train_docs) + "".join(val_docs) == text
  assert len("".join(val_docs)) == pytest.approx(0.1 * len(text), rel=0.01)
  assert len(train_docs) > 20  # cut into pieces so rows can be shuffled across the text


def test_rows_pack_whole_documents_with_segments_and_positions(tmp_path, tokenizer):
  texts = write_docs(tmp_path / "txt", 12)
  docs = data.open_source(str(tmp_path / "txt"))
  rows = next(iter(data.batches(docs, tokenizer, seq_len=64, global_batch=2, seed=3)))
  assert {k: v.shape for k, v in rows.items()} == {k: (2, 64) for k in ("inputs", "targets", "segment_ids", "positions")}
  recovered = []
  for r in range(2):
    seg, pos = rows["segment_ids"][r], rows["positions"][r]
    inside = seg[1:] == seg[:-1]  # targets are the inputs shifted by one within each document
    np.testing.assert_array_equal(rows["inputs"][r, 1:][inside], rows["targets"][r, :-1][inside])
    for s in np.unique(seg[seg > 0]):
      where = seg == s
      if pos[where][0] == 0:  # a document that starts in this row
        np.testing.assert_array_equal(pos[where], np.arange(where.sum()))
        ids = list(rows["inputs"][r][where]) + [int(rows["targets"][r][where][-1])]
        assert ids[0] == tokenizer.bos_id
        if ids[-1] == tokenizer.eos_id:
          recovered.append(tokenizer.decode(ids[1:-1]))
  assert recovered and set(recovered) <= set(texts)


def test_a_document_split_across_rows_restarts_at_position_zero_and_sees_only_its_own_piece(tokenizer):
  from lm.model import causal_segment_mask

  doc = "def f(x):\n" + "  return x + 1\n" * 5  # about 50 tokens: it spills into the next row
  ids = [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]
  L = 32
  assert L < len(ids) - 1 < 2 * L
  stream = np.tile(ids[:-1], 3), np.tile(ids[1:], 3)  # one stream of the document, repeated
  it = iter(data.batches([doc], tokenizer, seq_len=L, global_batch=1, seed=0))
  first, second = next(it), next(it)
  np.testing.assert_array_equal(first["inputs"][0], stream[0][:L])
  np.testing.assert_array_equal(second["inputs"][0], stream[0][L:2 * L])
  np.testing.assert_array_equal(second["targets"][0], stream[1][L:2 * L])
  n = len(ids) - 1 - L  # the document's continuation at the start of the second row
  seg, pos = second["segment_ids"][0], second["positions"][0]
  np.testing.assert_array_equal(pos, np.r_[np.arange(n), np.arange(L - n)])
  assert seg[0] != 0 and (seg[:n] == seg[0]).all() and (seg[n:] != seg[0]).all() and (seg != 0).all()
  piece = np.arange(L) < n
  expected = np.tril(np.ones((L, L), bool)) & (piece[:, None] == piece[None, :])
  np.testing.assert_array_equal(np.asarray(causal_segment_mask(seg[None]))[0], expected)


def test_process_shares_make_up_the_global_batch(tmp_path, tokenizer):
  write_docs(tmp_path / "txt", 30)
  docs = data.open_source(str(tmp_path / "txt"))
  kw = dict(seq_len=32, global_batch=4, seed=1, shuffle_window=4)
  whole = [next(it) for it in [iter(data.batches(docs, tokenizer, **kw))] for _ in range(3)]
  halves = [iter(data.batches(docs, tokenizer, rows=rows, **kw)) for rows in (range(0, 2), range(2, 4))]
  for step in range(3):
    parts = [next(h) for h in halves]
    for k in whole[step]:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[step][k])


def test_iterator_state_restores_the_exact_position(tmp_path, tokenizer):
  write_docs(tmp_path / "txt", 30)
  docs = data.open_source(str(tmp_path / "txt"))
  kw = dict(seq_len=32, global_batch=4, seed=5, shuffle_window=3)
  it = iter(data.batches(docs, tokenizer, **kw))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = iter(data.batches(docs, tokenizer, **kw))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other_seed = next(iter(data.batches(docs, tokenizer, **{**kw, "seed": 6})))
  assert not np.array_equal(other_seed["inputs"], next(iter(data.batches(docs, tokenizer, **kw)))["inputs"])
