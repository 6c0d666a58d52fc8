"""Corpus formats read with random access: Parquet row groups, and gzip or zstd JSON Lines through a
block index built once and cached beside each file."""

from __future__ import annotations

import array
import bisect
import codecs
import collections
import gzip
import io
import json
import os
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq
import zstandard

from lm.config import ConfigError

BLOCK_BYTES = 1 << 20  # lines are recompressed in independent zstd blocks of about this many bytes
INDEX_SUFFIXES = (".lmindex.npz", ".lmindex.zst")  # the files written beside each compressed one
INDEX_MARK = ".lmindex."  # in their names, and in their temporary ones


def utf8(text: str) -> str:
  """`text` with any lone surrogate (valid JSON, "\\ud83d" alone, but no UTF-8, which sentencepiece
  refuses) as '?'."""
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return text.encode("utf-8", errors="replace").decode("utf-8")


def malformed(e: json.JSONDecodeError) -> str:
  """json's message without its own position (some end in "at"), the column after it."""
  return f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"


def record_text(line: bytes, where: str, field: str) -> str:
  """The `field` of one JSON Lines record, read as text files are (bad bytes become U+FFFD, a BOM is
  dropped); `where` is FILE:LINE for the one-line error."""
  try:
    record = json.loads(line.decode("utf-8-sig", errors="replace"))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{where}: {malformed(e)}") from None
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    raise ConfigError(f"{where}: no string field '{field}' (set data.text_field)")
  return utf8(record[field])


T = TypeVar("T")
RECENT_BLOCKS = 4  # decoded row groups or blocks a reader keeps (a row group may be large): shuffled reads reach every one


class Recent:
  """The last `size` values loaded, by key; one that is not here is loaded (and the least recent
  dropped). Readers' threads share it: training reads while validation does."""

  def __init__(self, size: int):
    self.size, self.values, self.lock = size, collections.OrderedDict(), threading.Lock()

  def get(self, key: Hashable, load: Callable[[], T]) -> T:
    with self.lock:
      value = self.values.pop(key) if key in self.values else load()
      self.values[key] = value
      if len(self.values) > self.size:
        self.values.popitem(last=False)
      return value

  def __getstate__(self) -> dict[str, Any]:
    return {"size": self.size}  # a worker process loads its own

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["size"])


class Parquet:
  """Each row's `field`; a document is read with its row group, and the last RECENT_BLOCKS row groups read are kept."""

  def __init__(self, paths: Sequence[str], field: str):
    self.paths, self.field, self.groups, self.starts = list(paths), field, [], [0]
    for f, path in enumerate(self.paths):
      try:
        meta = pq.ParquetFile(path).metadata
      except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
        raise ConfigError(f"{path}: not a Parquet file ({' '.join(str(e).split())[:120]})") from None
      if field not in meta.schema.names:
        raise ConfigError(f"{path}: no column '{field}' (set data.text_field; columns: {', '.join(meta.schema.names)})")
      file_row = 0  # of the group's first row, for error messages
      for g in range(meta.num_row_groups):
        if rows := meta.row_group(g).num_rows:
          self.groups.append((f, g, file_row))
          self.starts.append(self.starts[-1] + rows)
          file_row += rows
    self.recent: Recent = Recent(RECENT_BLOCKS)

  def __len__(self) -> int:
    return self.starts[-1]

  def __getitem__(self, i: int) -> str:
    k = bisect.bisect_right(self.starts, i) - 1
    f, g, file_row = self.groups[k]
    group = self.recent.get((f, g), lambda: pq.ParquetFile(self.paths[f]).read_row_group(g, columns=[self.field]).column(0).to_pylist())
    text = group[i - self.starts[k]]
    if not isinstance(text, str):
      raise ConfigError(f"{self.paths[f]}: row {file_row + i - self.starts[k]}: '{self.field}' is {type(text).__name__}, not a string")
    return text


def has_record(line: bytes) -> bool:
  """Whether a JSON Lines line holds a record: a BOM alone (a file saved with one, then a blank first
  line) is blank, as record_text drops it."""
  return bool(line.removeprefix(codecs.BOM_UTF8).strip())


def line_index(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Where each JSON Lines record of the uncompressed `path` starts, and its line number: 16 bytes a
  line (a reader holds them in every process), not the 132 of a tuple in a list."""
  offsets, linenos, offset = array.array("q"), array.array("q"), 0  # compact while they grow, too
  with open(path, "rb") as fh:
    for lineno, line in enumerate(fh, 1):
      if has_record(line):
        offsets.append(offset)
        linenos.append(lineno)
      offset += len(line)
  return np.frombuffer(offsets, np.int64), np.frombuffer(linenos, np.int64)


def _zstd_frames(path: str, read_bytes: int = 1 << 16) -> Iterator[bytes]:
  """`path` decompressed, frame after frame. Unlike zstandard's stream reader, which ends quietly
  where the data does, it fails on a last frame cut short (a download that stopped)."""
  dctx = zstandard.ZstdDecompressor()
  frame, begun = dctx.decompressobj(), False
  with open(path, "rb") as fh:
    while data := fh.read(read_bytes):
      while data:
        yield frame.decompress(data)
        begun, data = not frame.eof, b""
        if frame.eof:  # what follows is the next frame's
          frame, data = dctx.decompressobj(), frame.unused_data
  if begun:
    raise EOFError("truncated: its last zstd frame ends early; copy or download the file again")


class _Stream(io.RawIOBase):
  """Chunks of bytes as a readable stream, for io.BufferedReader's lines."""

  def __init__(self, chunks: Iterator[bytes]):
    super().__init__()
    self.chunks, self.rest = chunks, memoryview(b"")

  def readable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    while not self.rest:
      if (chunk := next(self.chunks, None)) is None:
        return 0
      self.rest = memoryview(chunk)
    n = min(len(buffer), len(self.rest))
    buffer[:n], self.rest = self.rest[:n], self.rest[n:]
    return n


def _decompressed(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  return io.BufferedReader(_Stream(_zstd_frames(path)))  # for its lines


def _build_index(path: str, blocks_path: Path, index_path: Path) -> None:
  """Decompresses `path` once and writes its non-empty lines as independent zstd blocks."""
  compressor = zstandard.ZstdCompressor(level=3)
  starts, ends, linenos, pending = [], [], [], []
  block_offsets, block_starts = [0], [0]  # in the blocks file; in the decompressed lines
  tmp_blocks, tmp_index = (Path(f"{p}.tmp{os.getpid()}") for p in (blocks_path, index_path))
  try:
    with _decompressed(path) as lines, open(tmp_blocks, "wb") as out:
      try:
        for lineno, line in enumerate(lines, 1):
          if has_record(line):
            starts.append(ends[-1] if ends else 0)
            ends.append(starts[-1] + len(line))
            linenos.append(lineno)
            pending.append(line)
          if pending and (ends[-1] - block_starts[-1] >= BLOCK_BYTES):
            block_offsets.append(block_offsets[-1] + out.write(compressor.compress(b"".join(pending))))
            block_starts.append(ends[-1])
            pending = []
      except (OSError, EOFError, zstandard.ZstdError) as e:
        raise ConfigError(f"{path}: cannot decompress ({' '.join(str(e).split())[:120]})") from None
      if pending:
        block_offsets.append(block_offsets[-1] + out.write(compressor.compress(b"".join(pending))))
        block_starts.append(ends[-1])
    stat = os.stat(path)
    arrays = {"starts": starts, "ends": ends, "linenos": linenos, "block_offsets": block_offsets,
              "block_starts": block_starts, "source": [stat.st_size, stat.st_mtime_ns]}
    with open(tmp_index, "wb") as f:
      np.savez(f, **{k: np.asarray(v, np.int64) for k, v in arrays.items()})
    tmp_blocks.rename(blocks_path)
    tmp_index.rename(index_path)
  finally:  # an error, or Ctrl-C in a build of minutes, leaves no half-written copy beside the data
    tmp_blocks.unlink(missing_ok=True)
    tmp_index.unlink(missing_ok=True)


class CompressedJsonLines:
  """`.jsonl.gz` or `.jsonl.zst` files; FILE.lmindex.npz and FILE.lmindex.zst beside each hold its
  lines in blocks of about BLOCK_BYTES, so a document costs one block's decompression. They are built
  on first use and rebuilt when the file changes."""

  def __init__(self, paths: Sequence[str], field: str):
    self.paths, self.field, self.files, self.counts = list(paths), field, [], [0]
    for path in self.paths:
      index_path, blocks_path = (Path(path + suffix) for suffix in INDEX_SUFFIXES)
      stat = os.stat(path)
      fresh = index_path.exists() and blocks_path.exists() and \
          list(np.load(index_path)["source"]) == [stat.st_size, stat.st_mtime_ns]
      if not fresh:
        try:
          _build_index(path, blocks_path, index_path)
        except OSError as e:  # not writable: permissions, a read-only mount, a full disk
          raise ConfigError(f"{path}: cannot write its index beside it ({index_path}: {e.strerror or e}); "
                            f"copy the data somewhere writable") from None
      index = dict(np.load(index_path))
      self.files.append(index)
      self.counts.append(self.counts[-1] + len(index["starts"]))
    self.recent: Recent = Recent(RECENT_BLOCKS)

  def __len__(self) -> int:
    return self.counts[-1]

  def __getitem__(self, i: int) -> str:
    f = bisect.bisect_right(self.counts, i) - 1
    index, k = self.files[f], i - self.counts[f]
    start = int(index["starts"][k])
    b = bisect.bisect_right(index["block_starts"], start) - 1
    block = self.recent.get((f, b), lambda: self._block(f, b))
    base = int(index["block_starts"][b])
    line = block[start - base:int(index["ends"][k]) - base]
    return record_text(line, f"{self.paths[f]}:{int(index['linenos'][k])}", self.field)

  def _block(self, f: int, b: int) -> bytes:
    offsets = self.files[f]["block_offsets"]
    with open(self.paths[f] + INDEX_SUFFIXES[1], "rb") as fh:
      fh.seek(int(offsets[b]))
      return zstandard.ZstdDecompressor().decompress(fh.read(int(offsets[b + 1] - offsets[b])))
