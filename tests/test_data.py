"""Sources, splits and packed grain pipelines on files the tests write."""

import itertools
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest

from lm import data, token_cache
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
  with pytest.raises(ConfigError, match=r"bad.jsonl:2: malformed JSON \(.* at column \d+\)$"):
    source[1]
  with pytest.raises(ConfigError, match="bad.jsonl:1: no string field 'body'"):
    data.open_source(f"jsonl:{bad}", text_field="body")
  with pytest.raises(ConfigError, match=r"^.*bad.jsonl: not ArrayRecord files \(.+\)$"):
    data.open_source(f"arrayrecord:{bad}")
  # Records given as plain text would train as their raw JSON (or compressed bytes)
  with pytest.raises(ConfigError, match=re.escape(f"data source '{bad}' matches {bad}, a JSON Lines file that would train as its "
                                                  f"raw bytes; name its format (compressed files are read as JSON Lines): 'jsonl:{bad}'")):
    data.open_source(str(bad))
  with pytest.raises(ConfigError, match="a JSON Lines file that would train as its raw bytes"):
    data.open_source(str(tmp_path))  # a directory that holds some


def test_a_file_is_read_as_named_text_after_empty_documents_counts_and_one_text_is_read_once(tmp_path, monkeypatch):
  (tmp_path / "part[1].txt").write_text("the bracketed one")
  (tmp_path / "part1.txt").write_text("the other one")  # what "part[1].txt" matches as a glob pattern
  source = data.open_source(str(tmp_path / "part[1].txt"))
  assert [source[i] for i in range(len(source))] == ["the bracketed one"]
  (tmp_path / "late.jsonl").write_text('{"text": ""}\n' * 100 + '{"text": "at last"}\n')
  source = data.open_source(f"jsonl:{tmp_path / 'late.jsonl'}")
  assert len(source) == 101 and source[100] == "at last"
  reads, read = [], data.TextFiles.__getitem__
  monkeypatch.setattr(data.TextFiles, "__getitem__", lambda self, i: reads.append(i) or read(self, i))
  (tmp_path / "one.txt").write_text("line of text\n" * 10_000)
  data.split(DataConfig(source=str(tmp_path / "one.txt"), val_fraction=0.1))
  assert len(reads) == 2  # the check that it has text, and the split: a single text may be huge


def test_records_that_are_not_clean_utf8_are_read_as_text_files_are(tmp_path, tokenizer):
  """Scraped JSON Lines, saved with a byte-order mark: a Latin-1 byte reads as U+FFFD, as in a text
  file; a lone surrogate escape (valid JSON, not UTF-8) as '?'. They tokenize, train a tokenizer and
  make batches, no traceback."""
  from lm.config import TokenizerConfig
  from lm.tokenizer import train
  path = tmp_path / "scraped.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xe9 au lait"}\n{"text": "half an emoji \\ud83d here"}\n')
  source = data.open_source(f"jsonl:{path}")
  assert [source[0], source[1]] == ["caf\ufffd au lait", "half an emoji ? here"]
  train([source[0], source[1]] * 20, TokenizerConfig(vocab_size=300, model_type="char"), tmp_path / "t.model")
  rows = next(iter(data.batches(source, tokenizer, seq_len=16, global_batch=2, seed=0)))
  assert (rows["segment_ids"] != 0).sum() > 0


def test_a_single_texts_split_is_counted_in_characters(tmp_path):
  """A resume compares these: a text that grew by less than a piece changes them too."""
  (tmp_path / "one.txt").write_text("line of text\n" * 10_000)
  counts = lambda: data.document_counts(*data.split(DataConfig(source=str(tmp_path / "one.txt"), val_fraction=0.1)))
  before = counts()
  assert sum(before["train"] + before["validation"]) == 130_000
  with open(tmp_path / "one.txt", "a") as f:
    f.write("one more line\n")
  assert counts() != before


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


def test_separate_validation_files_are_cut_into_pieces_too(shared_data, tmp_path):
  """One long training file and one long validation file: cut as a single source is, so rows of a
  batch read different text."""
  text = (shared_data / "tinyshakespeare.txt").read_text()
  (tmp_path / "train.txt").write_text(text[:1_000_000])
  (tmp_path / "val.txt").write_text(text[1_000_000:])
  train_docs, val_docs = data.split(DataConfig(source=str(tmp_path / "train.txt"), val_source=str(tmp_path / "val.txt")))
  assert "".join(train_docs) == text[:1_000_000] and "".join(val_docs) == text[1_000_000:]
  assert len(train_docs) > 20 and len(val_docs) > 2


def test_held_out_documents_are_each_read_once(tmp_path, tokenizer):
  """Fewer held-out documents than rows: every document's tokens once, none repeated, padding rows
  after them; and two processes' rows of each batch make up one process's."""
  texts = write_docs(tmp_path / "txt", 3)
  docs = data.open_source(str(tmp_path / "txt"))
  kw = dict(seq_len=16, global_batch=8, limit=4)
  whole = data.held_out_batches(docs, tokenizer, rows=range(8), **kw)
  inputs = np.concatenate([b["inputs"] for b in whole])
  real = np.concatenate([b["segment_ids"] for b in whole]) != 0
  want = sorted([tokenizer.bos_id, *tokenizer.encode(t)] for t in texts)  # each document's inputs: BOS and its ids
  flat = inputs[real].tolist()  # documents start with BOS, and only they
  starts = [i for i, token in enumerate(flat) if token == tokenizer.bos_id]
  got = [flat[a:b] for a, b in zip(starts, starts[1:] + [len(flat)])]
  assert sorted(got) == want
  assert len(whole) == -(-sum(map(len, want)) // (16 * 8))
  halves = [data.held_out_batches(docs, tokenizer, rows=range(h * 4, h * 4 + 4), **kw) for h in (0, 1)]
  for batch, first, second in zip(whole, *halves):
    np.testing.assert_array_equal(batch["inputs"], np.concatenate([first["inputs"], second["inputs"]]))


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


def test_empty_documents_are_not_trained_on(tmp_path, tokenizer):
  """Read as text or from a token cache: BOS then EOS would teach the model to end right after BOS."""
  texts = ["first text\n", "", "second\n", "", "", "the third one\n"] * 8
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  token_cache.prepare(data.documents(f"jsonl:{jsonl}"), f"jsonl:{jsonl}", tokenizer, tmp_path / "cache", workers=1, shard_docs=4)
  for spec in (f"jsonl:{jsonl}", f"tokens:{tmp_path / 'cache'}"):
    rows = list(itertools.islice(data.batches(data.open_source(spec), tokenizer, seq_len=16, global_batch=2, seed=0), 6))
    real = sum(int(((r["inputs"] == tokenizer.bos_id) & (r["positions"] == 0)).sum()) for r in rows)
    empty = sum(int(((r["inputs"] == tokenizer.bos_id) & (r["targets"] == tokenizer.eos_id)).sum()) for r in rows)
    assert (real > 20, empty) == (True, 0), spec


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


def assert_resumes_exactly(make_iter, skip: int, take: int) -> None:
  """The batches after `skip` equal those a fresh iterator gives once set to the saved position."""
  it = make_iter()
  for _ in range(skip):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(take)]
  resumed = make_iter()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_a_window_yields_the_same_rows_of_each_stream_in_another_order(tmp_path, tokenizer):
  write_docs(tmp_path / "txt", 30)
  docs = data.open_source(str(tmp_path / "txt"))
  kw = dict(seq_len=16, global_batch=2, seed=4)
  plain, shuffled = (iter(data.batches(docs, tokenizer, shuffle_window=w, **kw)) for w in (1, 4))
  reordered = False
  for _ in range(3):
    a, b = [next(plain)["inputs"] for _ in range(4)], [next(shuffled)["inputs"] for _ in range(4)]
    for row in range(2):
      assert sorted(x[row].tobytes() for x in a) == sorted(x[row].tobytes() for x in b)
      reordered |= [x[row].tobytes() for x in a] != [x[row].tobytes() for x in b]
  assert reordered
  # The default window: about 16M tokens of the global batch, at most 1024 rows.
  sizes = ((8, 256), (256, 1024), (1024, 2048), (1 << 16, 2048))
  assert [data.shuffle_window(DataConfig(), rows, length) for rows, length in sizes] == [1024, 64, 8, 1]
  assert data.shuffle_window(DataConfig(shuffle_window=3), 8, 256) == 3


def test_iterator_state_restores_the_exact_position(tmp_path, tokenizer):
  write_docs(tmp_path / "txt", 30)
  docs = data.open_source(str(tmp_path / "txt"))
  kw = dict(seq_len=32, global_batch=4, seed=5, shuffle_window=3)
  assert_resumes_exactly(lambda: iter(data.batches(docs, tokenizer, **kw)), skip=7, take=5)
  other_seed = next(iter(data.batches(docs, tokenizer, **{**kw, "seed": 6})))
  assert not np.array_equal(other_seed["inputs"], next(iter(data.batches(docs, tokenizer, **kw)))["inputs"])


def write_corpus_formats(folder, texts):
  """The same documents as Parquet (two row groups), gzip and zstd JSON Lines (with blank lines)."""
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  folder.mkdir(exist_ok=True)
  pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), folder / "docs.parquet", row_group_size=len(texts) // 2 + 1)
  lines = "".join(json.dumps({"body": t}) + "\n" + ("\n" if i % 3 == 0 else "") for i, t in enumerate(texts)).encode()
  (folder / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
  (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))


def test_parquet_gzip_and_zstd_sources_round_trip_and_name_bad_rows(tmp_path, monkeypatch):
  from lm import formats
  monkeypatch.setattr(formats, "BLOCK_BYTES", 200)  # many blocks, so documents are found across them
  monkeypatch.setattr(formats, "RECENT_BLOCKS", 1)  # and a reader keeps no more than this many decoded
  texts = write_docs(tmp_path / "txt", 30)
  write_corpus_formats(tmp_path, texts)
  for spec in (f"parquet:{tmp_path}/*.parquet", f"jsonl:{tmp_path}/*.jsonl.gz", f"jsonl:{tmp_path}/*.jsonl.zst"):
    source = data.open_source(spec, text_field="body")
    assert [source[i] for i in reversed(range(len(source)))] == texts[::-1], spec
    assert len(source.recent.values) == 1
    in_worker = pickle.loads(pickle.dumps(source))  # as grain hands it to a worker process
    assert [in_worker[i] for i in range(len(source))] == texts, spec
  index = tmp_path / "docs.jsonl.zst.lmindex.npz"
  built = index.stat().st_mtime_ns
  assert data.open_source(f"jsonl:{tmp_path}/*.jsonl.zst", text_field="body")[29] == texts[29]
  assert index.stat().st_mtime_ns == built  # built once, cached beside the data
  assert len(data.open_source(f"jsonl:{tmp_path}/*.zst", text_field="body")) == 30  # its index is no document

  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  pq.write_table(pa.table({"body": ["fine", None]}), tmp_path / "bad.parquet")
  with pytest.raises(ConfigError, match=r"^\S*bad.parquet: row 1: 'body' is NoneType, not a string$"):
    data.open_source(f"parquet:{tmp_path}/bad.parquet", text_field="body")[1]
  with pytest.raises(ConfigError, match=r"^\S*docs.parquet: no column 'text' \(set data.text_field; columns: id, body\)$"):
    data.open_source(f"parquet:{tmp_path}/docs.parquet")
  (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "fine"}\n\n{"body": broken\n'))
  with pytest.raises(ConfigError, match=r"^\S*bad.jsonl.zst:3: malformed JSON"):
    data.open_source(f"jsonl:{tmp_path}/bad.jsonl.zst", text_field="body")[1]
  (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "docs.jsonl.gz").read_bytes()[:-20])
  with pytest.raises(ConfigError, match=r"^\S*cut.jsonl.gz: cannot decompress"):
    data.open_source(f"jsonl:{tmp_path}/cut.jsonl.gz", text_field="body")


def test_an_index_build_cut_short_leaves_nothing_beside_the_data(tmp_path, monkeypatch):
  """Ctrl-C while a compressed file's index is built (minutes, on a large file) leaves no temporary
  file that `jsonl:DIR` would take for data; a read-only mount is one line; `~` names a home directory."""
  import errno

  from lm import formats
  texts = write_docs(tmp_path / "txt", 30)
  write_corpus_formats(tmp_path / "corpus", texts)
  (tmp_path / "corpus" / "docs.parquet").unlink()
  (tmp_path / "corpus" / "docs.jsonl.gz").unlink()
  decompressed = formats._decompressed
  monkeypatch.setattr(formats, "_decompressed", lambda path: InterruptedLines(decompressed(path)))
  with pytest.raises(KeyboardInterrupt):
    data.open_source(f"jsonl:{tmp_path / 'corpus'}", text_field="body")
  assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["docs.jsonl.zst"]
  monkeypatch.setattr(formats, "_decompressed", decompressed)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert len(data.open_source("jsonl:~/corpus", text_field="body")) == 30

  def read_only(*args):
    raise OSError(errno.EROFS, "Read-only file system")

  (tmp_path / "corpus" / "docs.jsonl.zst.lmindex.npz").unlink()
  monkeypatch.setattr(formats, "_build_index", read_only)
  with pytest.raises(ConfigError, match=r"^\S*docs.jsonl.zst: cannot write its index beside it \(\S*docs.jsonl.zst.lmindex.npz: "
                                        r"Read-only file system\); copy the data somewhere writable$"):
    data.open_source(f"jsonl:{tmp_path / 'corpus'}", text_field="body")


class InterruptedLines:
  """A decompressed file's first line, then Ctrl-C."""

  def __init__(self, lines):
    self.lines, self.read = lines, 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.lines.close()

  def __iter__(self):
    return self

  def __next__(self):
    self.read += 1
    if self.read > 1:
      raise KeyboardInterrupt
    return next(self.lines)


def prepare(*args):
  import subprocess
  import sys

  from tests.conftest import ROOT
  return subprocess.run([sys.executable, "-m", "launch.prepare", "--quiet", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_a_token_cache_reader_keeps_few_shards_open(tmp_path, tokenizer, monkeypatch):
  """Shuffled reads reach every shard: each one kept open held a file descriptor and a memory map,
  past a process's limits on a large cache."""
  texts = write_docs(tmp_path / "txt", 12)
  token_cache.prepare(data.documents(str(tmp_path / "txt")), str(tmp_path / "txt"), tokenizer, tmp_path / "cache",
                      workers=1, shard_docs=1, progress=False)
  monkeypatch.setattr(token_cache, "OPEN_SHARDS", 3)
  cache = token_cache.TokenCache(tmp_path / "cache")
  open_files = lambda: len(os.listdir("/proc/self/fd"))
  before = open_files()
  got = {i: cache[i].tolist() for i in np.random.default_rng(0).permutation(12).tolist() * 2}
  assert open_files() - before <= 3
  assert got == {i: tokenizer.encode(texts[i]) for i in range(12)}


def test_token_cache_reads_like_its_source_resumes_and_refuses_another_tokenizer(tmp_path, tokenizer, shared_data):
  write_docs(tmp_path / "txt", 30)
  make = ["--workers", 2, "--shard-docs", 4, f"data.source={tmp_path / 'txt'}", f"tokenizer.path={tokenizer.path}"]
  out = prepare("--out", tmp_path / "cache", *make)
  assert out.returncode == 0, out.stderr

  # An interruption leaves some shards, a half-written one, and an index that is not complete.
  interrupted = tmp_path / "interrupted"
  shutil.copytree(tmp_path / "cache", interrupted)
  for name in ("00002.tokens.npy", "00002.offsets.npy", "00005.offsets.npy", "00007.tokens.npy", "00007.offsets.npy"):
    (interrupted / name).unlink()
  (interrupted / "00005.tokens.npy").rename(interrupted / "00005.tokens.tmp123")
  index = json.loads((interrupted / "index.json").read_text())
  (interrupted / "index.json").write_text(json.dumps({**index, "complete": False}))
  with pytest.raises(ConfigError, match=r"^token cache '.*interrupted' is incomplete; rerun the same lm-prepare command to finish it$"):
    data.open_source(f"tokens:{interrupted}")
  assert prepare("--out", interrupted, *make).returncode == 0
  files = sorted(p.name for p in (tmp_path / "cache").iterdir())
  assert sorted(p.name for p in interrupted.iterdir()) == files
  assert all((interrupted / f).read_bytes() == (tmp_path / "cache" / f).read_bytes() for f in files)

  cfg = dict(val_fraction=0.1)
  raw_train, raw_val = data.split(DataConfig(source=str(tmp_path / "txt"), **cfg))
  train, val = data.split(DataConfig(source=f"tokens:{tmp_path / 'cache'}", **cfg))
  assert [list(val[i]) for i in range(len(val))] == [tokenizer.encode(raw_val[i]) for i in range(len(raw_val))]
  # lm.packing packs a cache's rows at once, grain the text's row by row: the same rows, across windows,
  # for a share of the rows, with documents longer than a row; and it resumes exactly.
  for window, rows, seq_len in ((3, range(4), 32), (1, range(1, 3), 8)):
    kw = dict(seq_len=seq_len, global_batch=4, seed=2, shuffle_window=window, rows=rows)
    raw_it, it = iter(data.batches(raw_train, tokenizer, **kw)), iter(data.batches(train, tokenizer, **kw))
    for _ in range(8):
      want, got = next(raw_it), next(it)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert_resumes_exactly(lambda: iter(data.batches(train, tokenizer, **kw)), skip=5, take=4)

  from lm.tokenizer import Tokenizer
  other = Tokenizer(shared_data / "c4_en_32k_sentencepiece.model")
  with pytest.raises(ConfigError, match=r"^token cache '.*cache' was prepared with tokenizer .*t.model, not .*c4_en_32k_sentencepiece.model; set tokenizer.path=.*cache/tokenizer.model or prepare the cache again with this one$"):
    data.check_tokenizer(DataConfig(source=f"tokens:{tmp_path / 'cache'}"), other)
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a document without an end", "and another"] * 50),
                                 model_prefix=str(tmp_path / "no-eos"), model_type="char", eos_id=-1, minloglevel=2)
  with pytest.raises(ConfigError, match=r"^tokenizer .*no-eos.model has no end-of-sequence piece \(eos_id=-1\), which training "
                                        r"puts after every document; use a tokenizer that has one$"):
    data.check_tokenizer(DataConfig(), Tokenizer(tmp_path / "no-eos.model"))
  with pytest.raises(ConfigError, match=r"^'.*cache' holds a token cache made otherwise \(tokenizer: .*t.model then, .*c4_en_32k_sentencepiece.model now \(another SHA-256\)\); rerun with those settings, or use another directory$"):
    token_cache.prepare(data.documents(str(tmp_path / "txt")), str(tmp_path / "txt"), other, tmp_path / "cache", workers=1, shard_docs=4)
  rerun = prepare(f"data.source={tmp_path / 'txt'}", "--out", tmp_path / "cache", "--shard-docs", 8, f"tokenizer.path={tokenizer.path}")
  assert rerun.returncode == 1 and rerun.stderr == (f"error: '{tmp_path / 'cache'}' holds a token cache made otherwise (shard_docs: 4 then, "
                                                    f"8 now); rerun with those settings, or use another directory\n")
  # records of two fields: a cache of one, and a rerun that names the other (it finished the first's)
  records = tmp_path / "records.jsonl"
  records.write_text("".join(json.dumps({"body": f"body {i} " * 5, "title": f"title {i}"}) + "\n" for i in range(12)))
  fields = ["--shard-docs", 4, f"data.source=jsonl:{records}", f"tokenizer.path={tokenizer.path}", "--out", tmp_path / "records"]
  assert prepare(*fields, "data.text_field=body").returncode == 0
  rerun = prepare(*fields, "data.text_field=title")
  assert rerun.returncode == 1 and rerun.stderr == (f"error: '{tmp_path / 'records'}' holds a token cache made otherwise (text_field: "
                                                    f"'body' then, 'title' now); rerun with those settings, or use another directory\n")
  (tmp_path / "cache" / "index.json").write_text('{"format": ')  # a disk that filled up as it was written
  with pytest.raises(ConfigError, match=r"^'.*cache/index.json' is not a token cache's index; rerun the lm-prepare command that wrote it, into a new directory$"):
    data.open_source(f"tokens:{tmp_path / 'cache'}")
  with pytest.raises(ConfigError, match=r"^'.*txt' is not empty and holds no token cache; name a new directory$"):
    token_cache.prepare(data.documents(str(tmp_path / "txt")), str(tmp_path / "txt"), tokenizer, tmp_path / "txt", workers=1, shard_docs=4)


@pytest.mark.slow
def test_ctrl_c_stops_prepare_and_its_workers_in_one_line(tmp_path, tokenizer):
  import os
  import signal
  import subprocess
  import sys
  import time

  from tests.conftest import ROOT
  terminal = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from launch.prepare import main; sys.exit(main())"
  out = tmp_path / "cache"
  job = subprocess.Popen([sys.executable, "-c", terminal, "--quiet", "--out", str(out), "--workers", "2", "--shard-docs", "2",
                          "data.source=stdlib", f"tokenizer.path={tokenizer.path}"], cwd=ROOT, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
  while job.poll() is None and len(list(out.glob("*.offsets.npy"))) < 3:
    time.sleep(0.05)
  os.killpg(job.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the workers too
  try:
    _, stderr = job.communicate(timeout=120)
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
  assert job.returncode == 130 and "Traceback" not in stderr, stderr
  assert stderr.strip().splitlines() == [f"interrupted: the same command goes on from the shards written so far in {out}"]


def test_prepare_refuses_what_it_would_not_make_in_one_line(tmp_path, capsys):
  from launch.prepare import main
  (tmp_path / "file").write_text("x")
  assert main(["--out", str(tmp_path / "file"), "--quiet"]) == 1
  assert capsys.readouterr().err == f"error: --out '{tmp_path / 'file'}' is a file; name a directory for the cache\n"
  assert main(["--out", str(tmp_path / "cache"), "--quiet", "data.mixture={stdlib: 1}"]) == 1  # stdlib was tokenized
  assert capsys.readouterr().err == ("error: lm-prepare tokenizes data.source alone; prepare each source of data.mixture "
                                     "(or data.val_source) into its own cache\n")
  assert not (tmp_path / "cache").exists()
  assert main(["--out", str(tmp_path / "file" / "cache"), "--quiet"]) == 1  # before training a tokenizer on stdlib
  assert capsys.readouterr().err == f"error: --out directory '{tmp_path / 'file' / 'cache'}' is not writable: Not a directory\n"
  assert main(["--out", str(tmp_path / "cache"), "--quiet", f"data.source=tokens:{tmp_path / 'c0'}"]) == 1
  assert capsys.readouterr().err == (f"error: data.source='tokens:{tmp_path / 'c0'}' is a token cache already; lm-prepare "
                                     "tokenizes the others: stdlib, text files, jsonl:, parquet: or arrayrecord:\n")
  assert not (tmp_path / "cache").exists()


def test_prepare_checks_its_directory_and_tokenizer_before_training_one(tmp_path, capsys, tokenizer):
  from launch.prepare import main
  write_docs(tmp_path / "txt", 5)
  source = f"data.source={tmp_path / 'txt'}"
  assert main(["--out", str(tmp_path / "txt"), "--quiet", source]) == 1  # the source's own directory
  assert capsys.readouterr().err == f"error: '{tmp_path / 'txt'}' is not empty and holds no token cache; name a new directory\n"
  assert not (tmp_path / "txt" / "tokenizer.model").exists()  # no tokenizer trained into it first
  (tmp_path / "odd").mkdir()
  (tmp_path / "odd" / "index.json").write_text("{}")
  assert main(["--out", str(tmp_path / "odd"), "--quiet", source]) == 1
  assert capsys.readouterr().err == f"error: '{tmp_path / 'odd' / 'index.json'}' is not a token cache's index; name a new directory\n"
  (tmp_path / "cache").mkdir()  # a tokenizer an interrupted attempt trained, of 512 pieces
  shutil.copyfile(tokenizer.path, tmp_path / "cache" / "tokenizer.model")
  assert main(["--out", str(tmp_path / "cache"), "--quiet", source, "tokenizer.vocab_size=1024"]) == 1
  assert capsys.readouterr().err == (f"error: {tmp_path / 'cache' / 'tokenizer.model'} was trained as a bpe tokenizer of 512 pieces, "
                                     "not with tokenizer.model_type=bpe tokenizer.vocab_size=1024; delete it to train another, or use a new --out\n")
  (tmp_path / "mine").mkdir()  # the user's own tokenizer, where another is given
  (tmp_path / "mine" / "tokenizer.model").write_bytes(b"a tokenizer")
  assert main(["--out", str(tmp_path / "mine"), "--quiet", source, f"tokenizer.path={tokenizer.path}"]) == 1
  assert capsys.readouterr().err == (f"error: '{tmp_path / 'mine' / 'tokenizer.model'}' is another tokenizer than {tokenizer.path} "
                                     "(another SHA-256); use another directory, or remove it to have it replaced\n")
  assert (tmp_path / "mine" / "tokenizer.model").read_bytes() == b"a tokenizer"


def test_prepare_trains_its_tokenizer_on_the_documents_training_will_read(tmp_path, tokenizer, monkeypatch):
  """Not on those that training from the cache holds out, as lm-train trains its own."""
  from launch import prepare
  write_docs(tmp_path / "txt", 30)
  seen = []

  def train_tokenizer(docs, cfg, path):
    seen.extend(docs)
    shutil.copyfile(tokenizer.path, path)  # into the --out directory lm-prepare made
    return type(tokenizer)(path)

  monkeypatch.setattr(prepare, "train_tokenizer", train_tokenizer)
  assert prepare.main(["--out", str(tmp_path / "cache"), "--quiet", "--workers", "1", f"data.source={tmp_path / 'txt'}",
                       "data.val_fraction=0.1"]) == 0
  train, val = data.split(DataConfig(source=str(tmp_path / "txt"), val_fraction=0.1))
  assert seen == [train[i] for i in range(len(train))] and len(seen) == 27
  seen.clear()  # one document holds none out: the tokenizer learns from it (a cache for data.val_source, say)
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "only.txt").write_text("one short document\n")
  assert prepare.main(["--out", str(tmp_path / "one-cache"), "--quiet", "--workers", "1", f"data.source={tmp_path / 'one'}"]) == 0
  assert seen == ["one short document\n"]


def test_workers_keep_a_resumable_order(tmp_path, tokenizer):
  from lm.checkpoint import _DataPosition
  write_docs(tmp_path / "txt", 30)
  docs = data.open_source(str(tmp_path / "txt"))
  kw = dict(seq_len=32, global_batch=4, seed=5, shuffle_window=3, workers=2)
  it = iter(data.batches(docs, tokenizer, **kw))
  for _ in range(5):
    next(it)
  saved = _DataPosition(it).freeze().get_state()  # as a checkpoint stores it: JSON
  expected = [next(it) for _ in range(4)]
  it.close()
  resumed = iter(data.batches(docs, tokenizer, **kw))
  _DataPosition(resumed).set_state(saved)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  resumed.close()


def test_a_data_position_of_another_pipeline_is_one_line_not_an_unreadable_checkpoint(tmp_path, tokenizer):
  from lm.checkpoint import _DataPosition
  write_docs(tmp_path / "txt", 10)
  docs = data.open_source(str(tmp_path / "txt"))
  it = iter(data.batches(docs, tokenizer, seq_len=32, global_batch=2, seed=0, shuffle_window=3))
  next(it)
  saved = _DataPosition(it).freeze().get_state()
  older = saved.replace(b'"parent"', b'"parent_window_start_state"').replace(b'"taken"', b'"pos_in_window"')  # grain's window shuffle
  with pytest.raises(ConfigError, match=r"^the checkpoint's data position \(KeyError: 'parent'\) is not one this input pipeline reads"):
    _DataPosition(it).set_state(older)


def test_mixture_follows_its_weights_holds_out_per_source_and_resumes(tmp_path, tokenizer):
  from lm import config
  a, b = set(write_docs(tmp_path / "a", 40)), set(write_docs(tmp_path / "b", 20))
  b = {t.replace("document", "other") for t in b}
  for p in (tmp_path / "b").iterdir():
    p.write_text(p.read_text().replace("document", "other"))
  cfg = config.load(None, [f"data.mixture={{'{tmp_path / 'a'}': 0.7, '{tmp_path / 'b'}': 0.3}}", "data.val_fraction=0.1"])
  assert config.from_dict(config.to_dict(cfg)).data.mixture == {str(tmp_path / "a"): 0.7, str(tmp_path / "b"): 0.3}
  train, val = data.split(cfg.data)
  drawn = data.row_documents(train, seed=1, row=0, global_batch=1)
  first = [drawn[i] for i in range(2000)]
  assert sum(d in a for d in first) / 2000 == pytest.approx(0.7, abs=0.01)
  assert sum(d in b for d in first) + sum(d in a for d in first) == 2000
  held = [val.parts[i][j] for i in range(2) for j in range(len(val.parts[i]))]
  assert sum(d in a for d in held) == 4 and sum(d in b for d in held) == 2 and not set(held) & set(first)
  evaluated = data.held_out_batches(val, tokenizer, seq_len=32, global_batch=4, rows=range(4), limit=100)
  tokens = sum(int((batch["segment_ids"] != 0).sum()) for batch in evaluated)
  assert tokens == sum(len(tokenizer.encode(d)) + 1 for d in held)  # every held-out document, once

  kw = dict(seq_len=32, global_batch=4, seed=5, shuffle_window=3)
  assert_resumes_exactly(lambda: iter(data.batches(train, tokenizer, **kw)), skip=6, take=3)


def mixture_of_long_and_short(tmp_path, tokenizer, weights):
  """Sources whose documents differ in length 7-fold (67 and 9 tokens), and each one's first token."""
  long, short = tmp_path / "long", tmp_path / "short"
  for folder, text in ((long, "alpha " + "word " * 20), (short, "beta end")):
    folder.mkdir()
    for i in range(40):
      (folder / f"doc{i:03d}.txt").write_text(f"{text} {i}\n")
  firsts = [tokenizer.encode(t)[0] for t in ("alpha word", "beta end")]
  assert firsts[0] != firsts[1]
  return [str(long), str(short)], firsts


def started_shares(batches, tokenizer, firsts) -> list[float]:
  """Each source's share of the documents that start in the batches (BOS, then the source's first token)."""
  counts = np.zeros(len(firsts))
  for batch in batches:
    starts = batch["inputs"] == tokenizer.bos_id
    for s, first in enumerate(firsts):
      counts[s] += (starts & (batch["targets"] == first)).sum()
  return list(counts / counts.sum())


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.75, 0.25)])
def test_a_mixture_starts_documents_in_proportion_to_its_weights_in_every_row(tmp_path, tokenizer, weights):
  """grain's mix repeats a pattern (ABAB... for 0.5/0.5); split among 8 rows after mixing, each row read
  one source, and the source of long documents started a few percent of them, not half."""
  specs, firsts = mixture_of_long_and_short(tmp_path, tokenizer, weights)
  for spec in specs:
    token_cache.prepare(data.documents(spec), spec, tokenizer, f"{spec}-cache", workers=1, shard_docs=16, progress=False)
  text = data.Mixture([data.open_source(s) for s in specs], list(weights))
  cached = data.Mixture([data.open_source(f"tokens:{s}-cache") for s in specs], list(weights))
  kw = dict(seq_len=32, global_batch=8, seed=2)
  got = {name: list(itertools.islice(data.batches(docs, tokenizer, **kw), 50)) for name, docs in (("text", text), ("cache", cached))}
  for name in got:
    assert started_shares(got[name], tokenizer, firsts) == pytest.approx(weights, abs=0.05), name
  for want, batch in zip(got["text"], got["cache"]):  # the token cache's rows are the text's
    for k in want:
      np.testing.assert_array_equal(batch[k], want[k])
  assert_resumes_exactly(lambda: iter(data.batches(cached, tokenizer, shuffle_window=3, **kw)), skip=7, take=3)


def test_the_tokenizer_learns_from_every_document_of_a_mixture(tmp_path, monkeypatch):
  """Not grain's finite mix, which ends with the scarcest source (20 of these 1,002 documents), and
  not one source after another, which a line budget would fill with the first."""
  from lm import loop
  many, few = [f"many {i}" for i in range(1000)], ["few 0", "few 1"]
  seen = []
  monkeypatch.setattr(loop, "train_tokenizer", lambda docs, cfg, path: seen.extend(docs))
  loop.train_on_first(data.Mixture([many, few], [0.5, 0.5]), None, tmp_path / "t.model")
  assert sorted(seen) == sorted(many + few)
  assert set(seen[:4]) >= set(few)
