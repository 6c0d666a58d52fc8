"""Packing documents into rows of a global batch, and shuffling each row's stream in windows.

Row j of every global batch has its own stream: its documents (lm.data.row_documents: elements j,
j+B, j+2B, ... of the shuffle), each BOS + ids + EOS with inputs and targets one apart, concatenated
and cut into rows of seq_len; a piece of an element restarts its positions at 0 in the next row.
Then, with a window w > 1, the stream's rows are taken in windows of w, each in the order
`window_order` gives.

Text goes through grain per row (lm.data: ConcatThenSplitIterDataset, then `WindowShuffle`).
Token ids (a token cache) need no tokenizing, so `PackedRows` makes the same rows for all of a
process's rows at once: it walks only where a window's rows start, never their tokens, and its
position is the batch number and each stream's first row of the current window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

Cursor = tuple[int, int]  # (element, token offset in its inputs)


def window_order(seed: int, row: int, window: int, size: int) -> np.ndarray:
  """The order in which row `row`'s stream yields the rows of its window number `window`.
  (numpy's, not grain's index_shuffle, which costs about a millisecond an index for small windows.)"""
  return np.random.default_rng((seed, row, window)).permutation(size) if size > 1 else np.zeros(1, np.int64)


class WindowShuffle(grain.IterDataset):
  """A stream's rows shuffled within windows of `size`."""

  def __init__(self, parent: grain.IterDataset, *, size: int, seed: int, row: int):
    super().__init__(parent)
    self.size, self.seed, self.row = size, seed, row

  def __iter__(self) -> _WindowShuffleIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self)


class _WindowShuffleIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, ds: WindowShuffle):
    super().__init__(parent)
    self.ds, self.window, self.taken, self.rows = ds, -1, ds.size, []
    self.window_start = parent.get_state()

  def __next__(self) -> Any:
    if self.taken == self.ds.size:
      self.window_start, self.window, self.taken = self._parent.get_state(), self.window + 1, 0
      self._fill()
    self.taken += 1
    return self.rows[self.order[self.taken - 1]]

  def _fill(self) -> None:
    self.rows = [next(self._parent) for _ in range(self.ds.size)]
    self.order = window_order(self.ds.seed, self.ds.row, self.window, self.ds.size)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self.window_start, "window": self.window, "taken": self.taken}

  def set_state(self, state: dict[str, Any]) -> None:
    self.window_start, self.window, self.taken = state["parent"], state["window"], state["taken"]
    self._parent.set_state(self.window_start)
    if self.window >= 0:
      self._fill()


class _Stream:
  """One row's elements, and where each row of its current window starts."""

  def __init__(self, elements: grain.MapDataset, bos: int, eos: int, seq_len: int, size: int, seed: int, row: int):
    self.elements, self.seq_len, self.size, self.seed, self.row = elements, seq_len, size, seed, row
    self.head = np.array([bos] if bos >= 0 else [], np.int32)
    self.tail = np.array([eos], np.int32)
    self.docs: dict[int, np.ndarray] = {}  # the elements walked in this window
    self.window, self.starts, self.order = 0, [(0, 0)], window_order(seed, row, 0, size)

  def length(self, k: int) -> int:
    if k not in self.docs:
      self.docs[k] = self.elements[k]
    return len(self.head) + len(self.docs[k]) if len(self.docs[k]) else 0  # BOS + body + EOS, less one; an empty one is skipped

  def ids(self, k: int, lo: int, hi: int) -> np.ndarray:
    """(BOS + element k + EOS)[lo:hi], without copying the rest of a long document."""
    doc, h = self.docs[k], len(self.head)
    return np.concatenate([self.head[lo:], doc[max(lo - h, 0):hi - h], self.tail[:max(hi - h - len(doc), 0)]], dtype=np.int32)

  def pieces(self, start: Cursor) -> tuple[list[tuple[int, int, int]], Cursor]:
    """The (element, offset, length) pieces of the row at `start`, and where the next row starts."""
    (k, off), need, out = start, self.seq_len, []
    while need:
      take = min(self.length(k) - off, need)
      if take:
        out.append((k, off, take))
      need, off = need - take, off + take
      if off == self.length(k):
        k, off = k + 1, 0
    return out, (k, off)

  def start(self, batch: int) -> Cursor:
    """Where the row of global batch `batch` starts."""
    window, p = divmod(batch, self.size)
    while self.window < window:  # the next window starts where this one's last row ends
      self.walk_to(self.size)
      self.move_to(window=self.window + 1, start=self.starts[self.size])
    self.walk_to(self.order[p])
    return self.starts[self.order[p]]

  def move_to(self, window: int, start: Cursor) -> None:
    self.window, self.starts = window, [start]
    self.order = window_order(self.seed, self.row, window, self.size)
    self.docs = {k: doc for k, doc in self.docs.items() if k >= start[0]}

  def walk_to(self, i: int) -> None:
    while len(self.starts) <= i:
      self.starts.append(self.pieces(self.starts[-1])[1])

  def pack(self, start: Cursor, row: dict[str, np.ndarray]) -> None:
    end = 0
    for segment, (k, off, take) in enumerate(self.pieces(start)[0], 1):
      ids = self.ids(k, off, off + take + 1)
      row["inputs"][end:end + take] = ids[:-1]
      row["targets"][end:end + take] = ids[1:]
      row["segment_ids"][end:end + take] = segment
      row["positions"][end:end + take] = np.arange(take)
      end += take


class PackedRows(grain.IterDataset):
  """Rows `rows` of every global batch of token-id documents, as lm.data.batches makes them of text."""

  def __init__(self, documents: Sequence[grain.MapDataset], bos: int, eos: int, *, seq_len: int, rows: range,
               window: int, seed: int):
    """`documents`: each row of `rows`' own documents, in order."""
    super().__init__()
    self.documents, self.bos, self.eos, self.seq_len = list(documents), bos, eos, seq_len
    self.rows, self.window, self.seed = rows, max(window, 1), seed

  def __iter__(self) -> _PackedRowsIterator:
    return _PackedRowsIterator(self)


class _PackedRowsIterator(grain.DatasetIterator):
  def __init__(self, ds: PackedRows):
    super().__init__()
    self.ds, self.batch = ds, 0
    self.streams = [_Stream(docs, ds.bos, ds.eos, ds.seq_len, ds.window, ds.seed, j) for docs, j in zip(ds.documents, ds.rows)]

  def __next__(self) -> dict[str, np.ndarray]:
    shape = (len(self.streams), self.ds.seq_len)
    out = {k: np.empty(shape, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}  # rows are always full
    for r, stream in enumerate(self.streams):
      stream.pack(stream.start(self.batch), {k: v[r] for k, v in out.items()})
    self.batch += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return {"batch": self.batch, "windows": [[s.window, *s.starts[0]] for s in self.streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    self.batch = state["batch"]
    for stream, (window, k, off) in zip(self.streams, state["windows"]):
      stream.move_to(window=window, start=(k, off))
