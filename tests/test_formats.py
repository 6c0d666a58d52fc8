"""File readers on damaged or unusual files the tests write: cut-short downloads, byte-order marks,
missing cache shards, and the memory a JSON Lines index takes."""

import gzip
import json
import pickle
import re
import tracemalloc

import pytest
import zstandard

from lm import data, formats, token_cache
from lm.config import ConfigError

BOM = b"\xef\xbb\xbf"


def jsonl_bytes(n: int) -> bytes:
  return b"".join(json.dumps({"text": f"document {i} " + "word " * (i % 7)}).encode() + b"\n" for i in range(n))


def test_a_zstd_file_cut_short_is_refused_in_one_line(tmp_path):
  """A download that stopped: zstd -t says "premature end"; reading it must not index the documents
  before the cut and fail on the cut line only when training reaches it."""
  lines = jsonl_bytes(2000)
  stream = zstandard.ZstdCompressor().compressobj()
  for name, packed in (("one_frame", zstandard.ZstdCompressor().compress(lines)),  # with its size in the header
                       ("streamed", stream.compress(lines) + stream.flush()),  # as the zstd CLI writes a pipe
                       ("tiny", zstandard.ZstdCompressor().compress(b'{"text": "one"}\n'))):
    path = tmp_path / f"{name}.jsonl.zst"
    path.write_bytes(packed[:len(packed) // 2])
    with pytest.raises(ConfigError, match=rf"^\S*{name}.jsonl.zst: cannot decompress \([^\n]*truncated[^\n]*\)$"):
      data.open_source(f"jsonl:{path}")
    assert sorted(p.name for p in tmp_path.iterdir() if name in p.name) == [path.name]  # no index left beside it


def test_zstd_and_gzip_files_of_several_frames_read_every_frame(tmp_path, monkeypatch):
  monkeypatch.setattr(formats, "BLOCK_BYTES", 300)  # index blocks that straddle the frames
  lines = jsonl_bytes(60).splitlines(keepends=True)
  parts = [b"".join(lines[:1]), b"".join(lines[1:25]) + b"\n", b"", b"".join(lines[25:])]  # one empty frame
  c = zstandard.ZstdCompressor()
  (tmp_path / "frames.jsonl.zst").write_bytes(b"".join(c.compress(p) for p in parts))
  (tmp_path / "members.jsonl.gz").write_bytes(b"".join(gzip.compress(p) for p in parts))
  want = [json.loads(line)["text"] for line in lines]
  for name in ("frames.jsonl.zst", "members.jsonl.gz"):
    source = data.open_source(f"jsonl:{tmp_path / name}")
    assert [source[i] for i in range(len(source))] == want, name
  cut = b"".join(c.compress(p) for p in parts)[:-10]  # its last frame unfinished
  (tmp_path / "cut.jsonl.zst").write_bytes(cut)
  with pytest.raises(ConfigError, match=r"^\S*cut.jsonl.zst: cannot decompress \([^\n]*truncated"):
    data.open_source(f"jsonl:{tmp_path / 'cut.jsonl.zst'}")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_json_lines_with_a_byte_order_mark_read_as_without_it(tmp_path, suffix):
  """Editors on Windows save one: alone on the first line, or before the first record."""
  pack = {".jsonl": bytes, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}[suffix]
  for name, raw in (("alone", BOM + b'\r\n{"text": "a"}\n{"text": "b"}\n'), ("spaced", BOM + b'  \n\n{"text": "a"}\n{"text": "b"}'),
                    ("before", BOM + b'{"text": "a"}\n{"text": "b"}\n')):
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(pack(raw))
    source = data.open_source(f"jsonl:{path}")
    assert [source[i] for i in range(len(source))] == ["a", "b"], path.name
  path = tmp_path / f"bad{suffix}"
  path.write_bytes(pack(BOM + b'\n{"text": "a"}\n{"text": broken}\n'))
  with pytest.raises(ConfigError, match=rf"^\S*bad{suffix}:3: malformed JSON"):
    data.open_source(f"jsonl:{path}")[1]  # the line numbers count the BOM's line


def test_a_text_file_with_a_byte_order_mark_reads_as_without_it(tmp_path):
  (tmp_path / "a.txt").write_bytes(BOM + b"hello\nworld\n")
  (tmp_path / "b.txt").write_bytes(b"plain \xef\xbb\xbf inside\n")  # not at the start: text, kept
  source = data.open_source(str(tmp_path))
  assert [source[0], source[1]] == ["hello\nworld\n", "plain \ufeff inside\n"]


def test_a_json_lines_index_is_compact_and_reads_as_before(tmp_path):
  """Its index is held in every process: 100M lines as Python tuples took 13 GB."""
  n = 100_000
  (tmp_path / "a.jsonl").write_bytes(b"\n" + jsonl_bytes(n) + b"  \n")
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "last"}\n\n{"text": broken}\n')
  tracemalloc.start()
  try:
    source = data.open_source(f"jsonl:{tmp_path}/*.jsonl")
    held, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert held < 24 * n and peak < 48 * n, (held / n, peak / n)  # bytes a line
  assert len(source) == n + 2
  assert [source[0], source[n - 1], source[n]] == ["document 0 ", f"document {n - 1} " + "word " * ((n - 1) % 7), "last"]
  with pytest.raises(ConfigError, match=r"^\S*b.jsonl:3: malformed JSON"):
    source[n + 1]
  with pytest.raises(ConfigError, match=rf"^\S*a.jsonl:{n + 1}: "):
    data.JsonLines([str(tmp_path / "a.jsonl")], "body")[n - 1]  # (a source checks its first record's field)
  in_worker = pickle.loads(pickle.dumps(source))  # as grain hands it to a worker process
  assert in_worker[n] == "last"


def test_a_token_cache_missing_a_shard_is_refused_in_one_line_and_prepare_restores_it(tmp_path):
  from lm.config import TokenizerConfig
  from lm.tokenizer import train
  texts = [f"text number {i}: " + "abc " * i for i in range(10)]
  for i, t in enumerate(texts):
    (tmp_path / f"{i:02d}.txt").write_text(t)
  tokenizer = train(texts * 5, TokenizerConfig(vocab_size=300, model_type="char"), tmp_path / "t.model")
  cache = tmp_path / "cache"

  def prepare():
    return token_cache.prepare(data.documents(f"{tmp_path}/*.txt"), f"{tmp_path}/*.txt", tokenizer, cache, workers=1,
                               shard_docs=3, progress=False)

  prepare()
  for lost in ("00001.tokens.npy", "00003.offsets.npy"):
    (cache / lost).unlink()
    with pytest.raises(ConfigError, match=re.escape(f"token cache '{cache}' is missing {cache / lost}; rerun the "
                                                    f"lm-prepare command that wrote it, which writes it again")):
      token_cache.TokenCache(cache)
    prepare()
    restored = token_cache.TokenCache(cache)
    assert [tokenizer.decode(restored[i].tolist()) for i in range(len(texts))] == texts
