"""Document sources and grain pipelines that pack tokens into fixed-length rows.

Row j of every global batch comes from its own stream (documents j, j+B, j+2B, ... of a seeded
shuffle; of each source's, mixed per row, for a mixture), so the data order depends on the global
batch size only, never on how many processes read it: each process builds just the streams of its
own rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import signal
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import flags
import grain
import grain.experimental as gx
import numpy as np

from lm.config import ConfigError, DataConfig
from lm.formats import INDEX_MARK, CompressedJsonLines, Parquet, line_index, record_text
from lm.packing import PackedRows, WindowShuffle
from lm.token_cache import TokenCache
from lm.tokenizer import Tokenizer

SPLIT_SEED = 0  # fixed, so the held-out documents never change with train.seed
CHUNK_CHARS = 1 << 15  # one long text is cut at line ends into pieces of about this size
WINDOW_TOKENS, MAX_WINDOW = 1 << 24, 1024  # the default data.shuffle_window's bounds
RECORD_FILES = {".jsonl": ("JSON Lines", "jsonl"), ".gz": ("compressed", "jsonl"), ".zst": ("compressed", "jsonl"),
                ".parquet": ("Parquet", "parquet"), ".array_record": ("ArrayRecord", "arrayrecord"),
                ".arrayrecord": ("ArrayRecord", "arrayrecord")}  # a file suffix's format, and the prefix that reads it


class TextFiles:
  """Each file is one document."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> str:
    return Path(self.paths[i]).read_text(encoding="utf-8-sig", errors="replace")  # a BOM is no text


class JsonLines:
  """Each non-empty line of each file is one document; a line offset index makes it random-access."""

  def __init__(self, paths: Sequence[str], field: str):
    self.paths, self.field = list(paths), field
    index = [line_index(path) for path in self.paths]
    self.offsets, self.linenos = [o for o, _ in index], [n for _, n in index]  # each file's
    self.counts = np.cumsum([0] + [len(o) for o in self.offsets])  # the documents before each file

  def __len__(self) -> int:
    return int(self.counts[-1])

  def __getitem__(self, i: int) -> str:
    f = int(np.searchsorted(self.counts, i, side="right")) - 1
    k = i - self.counts[f]
    with open(self.paths[f], "rb") as fh:
      fh.seek(self.offsets[f][k])
      line = fh.readline()
    return record_text(line, f"{self.paths[f]}:{self.linenos[f][k]}", self.field)


class ArrayRecords:
  """Each record is one UTF-8 document."""

  def __init__(self, paths: Sequence[str]):
    try:
      self.source = grain.sources.ArrayRecordDataSource(list(paths))
    except RuntimeError as e:  # array_record's reader fails on a file that is not one of its own
      raise ConfigError(f"{', '.join(paths)}: not ArrayRecord files ({' '.join(str(e).split())[:120]})") from None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> str:
    return self.source[i].decode("utf-8", errors="replace")


class Mixture:
  """Documents of several sources, which each row of a global batch draws in proportion to their
  weights (`row_documents`). Not a sequence: a finite mix would end with its scarcest source."""

  def __init__(self, parts: Sequence[Any], weights: Sequence[float]):
    self.parts, self.weights = list(parts), list(weights)


class Subset:
  def __init__(self, source: Any, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> str:
    return self.source[self.indices[i]]


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
  """Cuts a long text at the first line end after every `size` characters."""
  out, start = [], 0
  while start < len(text):
    end = text.find("\n", start + size)
    end = len(text) if end == -1 else end + 1
    out.append(text[start:end])
    start = end
  return out


def stdlib_files() -> list[str]:
  """The interpreter's own standard library, without the installed packages beside it."""
  paths = []
  for folder, subdirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
    subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
    paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
  return sorted(paths)


def _match(pattern: str, spec: str) -> list[str]:
  pattern = os.path.expanduser(pattern)
  if os.path.isfile(pattern):  # as named: a file called "part[1].txt" is no pattern for "part1.txt"
    return [pattern]
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "**", "*")
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ConfigError(f"data source '{spec}' matched no files")
  return paths


def _text_files(spec: str) -> TextFiles:
  """Every file read whole as one document; a file of records would train as its raw bytes."""
  paths = _match(spec, spec)
  for path in paths:
    if Path(path).suffix in RECORD_FILES:
      what, prefix = RECORD_FILES[Path(path).suffix]
      raise ConfigError(f"data source '{spec}' matches {path}, a {what} file that would train as its raw bytes; name "
                        f"its format (compressed files are read as JSON Lines): '{prefix}:{spec}'")
  return TextFiles(paths)


def _jsonl(spec: str, paths: list[str], text_field: str) -> Any:
  paths = [p for p in paths if INDEX_MARK not in os.path.basename(p)]  # when a glob or directory also matches our indexes
  compressed = [p.endswith((".gz", ".zst")) for p in paths]
  if any(compressed) and not all(compressed):
    raise ConfigError(f"data source '{spec}' matches both compressed and plain files; name one kind (or use data.mixture)")
  return (CompressedJsonLines if all(compressed) else JsonLines)(paths, text_field)


def _has_text(doc: str | np.ndarray) -> bool:
  return bool(doc.strip()) if isinstance(doc, str) else len(doc) > 0


def open_source(spec: str, text_field: str = "text") -> Any:
  """`stdlib`, a path, directory or glob of text files, `jsonl:GLOB` (plain, .gz or .zst),
  `parquet:GLOB`, `arrayrecord:GLOB`, or `tokens:DIR` (a token cache: arrays of token ids)."""
  kind, sep, rest = spec.partition(":")
  if spec == "stdlib":
    source = TextFiles(stdlib_files())
  elif sep and kind == "jsonl":
    source = _jsonl(spec, _match(rest, spec), text_field)
  elif sep and kind == "parquet":
    source = Parquet(_match(rest, spec), text_field)
  elif sep and kind == "tokens":
    source = TokenCache(rest)
  elif sep and kind == "arrayrecord":
    source = ArrayRecords(_match(rest, spec))
  else:
    source = _text_files(spec)
  if not any(_has_text(source[i]) for i in range(len(source))):  # stops at the first document with text
    raise ConfigError(f"data source '{spec}' has no text")
  return source


def text_field(cfg: DataConfig) -> str | None:
  """The field data.source's documents are read from: None for sources that are not records."""
  kind, sep, _ = cfg.source.partition(":")
  return cfg.text_field if sep and kind in ("jsonl", "parquet") else None


def documents(spec: str, text_field: str = "text") -> Any:
  """A source's documents, a single long text cut into chunks: what a token cache stores, and what
  training or validation reads of a source that is not split."""
  source = open_source(spec, text_field)
  text = source[0] if len(source) == 1 else None  # read once: it may be one huge file
  return chunks(text) if isinstance(text, str) else source


def split(cfg: DataConfig) -> tuple[Any, Any | None]:
  """(train, validation) documents; validation is None when nothing is held out. In a mixture each
  source holds out its own documents, and validation reads them all (`held_out_batches`)."""
  if cfg.mixture:
    pairs = [_split_source(spec, cfg) for spec in cfg.mixture]
    weights = list(cfg.mixture.values())
    held = [(val, w) for (_, val), w in zip(pairs, weights) if val is not None]
    return Mixture([t for t, _ in pairs], weights), (Mixture(*zip(*held)) if held else None)
  if cfg.val_source:
    return documents(cfg.source, cfg.text_field), documents(cfg.val_source, cfg.text_field)
  return _split_source(cfg.source, cfg)


def document_counts(train: Any, validation: Any | None) -> dict[str, list[int]]:
  """The documents of each source that training and validation read (of a single text cut into
  pieces, its characters): the split, and a saved data position, hold for these only."""
  size = lambda docs: sum(map(len, docs)) if isinstance(docs, list) else len(docs)
  count = lambda docs: [] if docs is None else [size(p) for p in docs.parts] if isinstance(docs, Mixture) else [size(docs)]
  return {"train": count(train), "validation": count(validation)}


def _split_source(spec: str, cfg: DataConfig) -> tuple[Any, Any | None]:
  source = open_source(spec, cfg.text_field)
  text = source[0] if len(source) == 1 else None  # read once: it may be one huge file
  if isinstance(text, str):
    cut = int(len(text) * (1 - cfg.val_fraction))
    return chunks(text[:cut]), (chunks(text[cut:]) if cut < len(text) else None)
  return split_documents(source, cfg.val_fraction, spec)


def split_documents(docs: Any, val_fraction: float, spec: str) -> tuple[Subset, Subset | None]:
  """(train, validation): a seeded `val_fraction` of the documents (at least one) held out; a token
  cache of them holds out the same ones."""
  held = round(len(docs) * val_fraction)
  if val_fraction > 0 and held == 0:
    held = 1
  if held >= len(docs):
    raise ConfigError(f"data.val_fraction={val_fraction} holds out all {len(docs)} documents of '{spec}'")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
  val = Subset(docs, sorted(order[:held])) if held else None
  return Subset(docs, sorted(order[held:])), val


def _caches(cfg: DataConfig) -> list[TokenCache]:
  specs = list(cfg.mixture) or [cfg.source, cfg.val_source]
  return [TokenCache(s.partition(":")[2]) for s in specs if s.startswith("tokens:")]


def cache_tokenizer(cfg: DataConfig) -> Path | None:
  """The tokenizer a token cache among the sources was prepared with, for a run that names none."""
  caches = _caches(cfg)
  return caches[0].dir / "tokenizer.model" if caches else None


def check_tokenizer(cfg: DataConfig, tokenizer: Tokenizer) -> None:
  if tokenizer.eos_id < 0:  # every document's last target would be -1: the vocabulary's last piece, silently
    raise ConfigError(f"tokenizer {tokenizer.path} has no end-of-sequence piece (eos_id=-1), which training puts after "
                      f"every document; use a tokenizer that has one")
  digest = tokenizer.sha256
  for cache in _caches(cfg):
    if cache.tokenizer_sha256 != digest:
      raise ConfigError(f"token cache '{cache.dir}' was prepared with tokenizer {cache.index['tokenizer']['path']}, not {tokenizer.path}; "
                        f"set tokenizer.path={cache.dir / 'tokenizer.model'} or prepare the cache again with this one")


def row_documents(docs: Any, seed: int, row: int, global_batch: int) -> grain.MapDataset:
  """Row `row`'s documents: every `global_batch`-th of an endless seeded shuffle, from the `row`-th
  on; of a mixture, each source's so (its shuffle seeded seed + its index), mixed by weight. (Mixed
  first and split among the rows after, grain's repeating pattern, ABAB... for 0.5/0.5, gave each row
  one source where its period shares a factor with the batch: row counts and document lengths, not
  the weights, set the proportions.)"""
  if isinstance(docs, Mixture):
    parts = [row_documents(p, seed + i, row, global_batch) for i, p in enumerate(docs.parts)]
    return grain.MapDataset.mix(parts, docs.weights)
  return grain.MapDataset.source(docs).shuffle(seed).repeat()[row::global_batch]


def every_document(docs: Any) -> Iterator[Any]:
  """Each document once; a mixture's sources interleaved by weight until all are read (a tokenizer
  that stops at a budget of lines sees each source, not the first alone)."""
  if not isinstance(docs, Mixture):
    yield from (docs[i] for i in range(len(docs)))
    return
  taken = [0] * len(docs.parts)
  while left := [i for i, p in enumerate(docs.parts) if taken[i] < len(p)]:
    i = min(left, key=lambda i: (taken[i] + 1) / docs.weights[i])  # the source furthest behind its weight
    yield docs.parts[i][taken[i]]
    taken[i] += 1


class _Tokenize(grain.transforms.Map):
  """A document (text, or token ids from a cache) as BOS + ids + EOS, split into inputs and targets;
  None when that leaves nothing to predict. (Named transforms: grain reads a lambda's source to name
  it, for every stream.)"""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, doc: str | np.ndarray) -> dict[str, np.ndarray] | None:
    bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
    body = self.tokenizer.encode(doc) if isinstance(doc, str) else doc
    if len(body) == 0:  # an empty document would teach end-of-sequence right after BOS
      return None
    ids = np.concatenate([[bos] if bos >= 0 else [], body, [eos]]).astype(np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}


class _Something(grain.transforms.Filter):
  def filter(self, element: Any) -> bool:
    return element is not None


class _Rename(grain.transforms.Map):
  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"inputs": row["inputs"], "targets": row["targets"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


class _Stack(grain.transforms.Map):
  def map(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def shuffle_window(cfg: DataConfig, global_batch: int, seq_len: int) -> int:
  """data.shuffle_window, where 0 means as many rows as keep about 16M tokens of the global batch in
  the window, at most 1024: text is tokenized a window ahead before its first batch, and each host
  holds its rows' share. (From global settings only, so the order does not depend on the hosts.)"""
  if cfg.shuffle_window:
    return cfg.shuffle_window
  return max(1, min(MAX_WINDOW, WINDOW_TOKENS // (global_batch * seq_len)))


def token_ids(docs: Any) -> bool:
  """Whether the documents are token ids (of token caches) already."""
  if isinstance(docs, Mixture):
    return all(token_ids(p) for p in docs.parts)
  return isinstance(docs.source if isinstance(docs, Subset) else docs, TokenCache)


def held_out_batches(docs: Any, tokenizer: Tokenizer, *, seq_len: int, global_batch: int, rows: range, limit: int
                     ) -> list[dict[str, np.ndarray]]:
  """Up to `limit` global batches (rows `rows` of each) of the held-out documents, read once in one
  seeded order and packed into consecutive rows; the last batch is filled with empty rows (segment 0,
  outside the loss). Training's stream per row would repeat a held-out set smaller than the batch, and
  weigh its documents unevenly. A mixture's sources are read whole: a mix ends with its scarcest source."""
  parts = docs.parts if isinstance(docs, Mixture) else [docs]
  ordered = grain.MapDataset.concatenate([grain.MapDataset.source(p) for p in parts]).shuffle(SPLIT_SEED)
  ordered = ordered.map(_Tokenize(tokenizer)).filter(_Something())
  packed = gx.ConcatThenSplitIterDataset(ordered.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
                                         length_struct={"inputs": seq_len, "targets": seq_len}).map(_Rename())
  rows_read = list(itertools.islice(packed, limit * global_batch))
  if not rows_read:
    return []
  rows_read += [{k: np.zeros_like(v) for k, v in rows_read[0].items()}] * (-len(rows_read) % global_batch)
  return [_Stack().map([rows_read[start + j] for j in rows]) for start in range(0, len(rows_read), global_batch)]


def padding_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """A batch of `batches`' shape whose rows are all padding (segment 0): outside the loss."""
  return {k: np.zeros((rows, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}


def _leave_ctrl_c(worker: int, workers: int) -> None:
  """A terminal's Ctrl-C reaches every process of its group: a worker leaves it to the trainer, which
  saves and stops them (each printed its KeyboardInterrupt's traceback)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches(docs: Any, tokenizer: Tokenizer, *, seq_len: int, global_batch: int, seed: int,
            shuffle_window: int = 1, rows: range | None = None, workers: int = 0) -> grain.IterDataset:
  """Rows `rows` (default: all) of every global batch, the rows this process feeds to its devices:
  dicts of [len(rows), seq_len] int32 arrays `inputs`, `targets`, `segment_ids` (0 marks padding)
  and `positions`. Token ids are packed by lm.packing into the same rows, in this process. For text,
  with `workers`, grain's worker processes each make every `workers`-th batch (documents sliced among
  them), so the order depends on the worker count too, and is as deterministic and resumable."""
  rows = rows or range(global_batch)
  if token_ids(docs):
    packed = PackedRows([row_documents(docs, seed, j, global_batch) for j in rows], tokenizer.bos_id, tokenizer.eos_id,
                        seq_len=seq_len, rows=rows, window=shuffle_window, seed=seed)
    return gx.ThreadPrefetchIterDataset(packed, prefetch_buffer_size=2)
  streams = []
  for j in rows:
    # Streams are read synchronously: one prefetch thread below serves all of them.
    stream = row_documents(docs, seed, j, global_batch).map(_Tokenize(tokenizer)).filter(_Something())
    stream = stream.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    stream = gx.ConcatThenSplitIterDataset(stream, length_struct={"inputs": seq_len, "targets": seq_len})
    if shuffle_window > 1:
      stream = WindowShuffle(stream, size=shuffle_window, seed=seed, row=j)
    streams.append(stream.map(_Rename()))
  stacked = gx.ZipIterDataset(streams).map(_Stack())
  if workers:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag here that scripts never parse (google/grain#1355)
      flags.FLAGS.mark_as_parsed()
    stacked = stacked.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                                  worker_init_fn=_leave_ctrl_c)
  return gx.ThreadPrefetchIterDataset(stacked, prefetch_buffer_size=2)
