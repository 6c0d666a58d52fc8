"""A token cache: a source's documents tokenized once, in worker processes, into `.npy` shards.

DIR/index.json names the source, the tokenizer (its SHA-256) and the shards; DIR/tokenizer.model is a
copy of the tokenizer; shard s holds documents [s * shard_docs, (s + 1) * shard_docs) as
`NNNNN.tokens.npy` (uint32 ids, one document after another) and `NNNNN.offsets.npy` (where each
starts). A shard appears only once both files are complete, so an interrupted prepare resumes from
the shards already there and writes the same files an uninterrupted one would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from lm.config import ConfigError
from lm.formats import Recent
from lm.tokenizer import Tokenizer, file_digest

FORMAT = 1
OPEN_SHARDS = 128  # memory maps a reader keeps open, each holding a file descriptor: shuffled reads reach every shard
_worker: dict[str, Any] = {}  # the documents and tokenizer of a prepare worker process


def _shard_paths(out: Path, s: int) -> tuple[Path, Path]:
  return out / f"{s:05d}.tokens.npy", out / f"{s:05d}.offsets.npy"


def _start_worker(docs: Any, tokenizer_path: str, out: Path, shard_docs: int) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent's to handle, by ending the pool
  _worker.update(docs=docs, tokenizer=Tokenizer(tokenizer_path), out=out, shard_docs=shard_docs)


def _write_shard(s: int) -> int:
  docs, sp, out, per = _worker["docs"], _worker["tokenizer"], _worker["out"], _worker["shard_docs"]
  ids = [np.asarray(sp.encode(docs[i]), np.uint32) for i in range(s * per, min(len(docs), (s + 1) * per))]
  offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
  tokens_path, offsets_path = _shard_paths(out, s)
  for path, array in ((tokens_path, np.concatenate(ids)), (offsets_path, offsets)):  # offsets last: they mark it done
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
      np.save(f, array)
    tmp.rename(path)
  return int(offsets[-1])


def existing(out: Path) -> dict[str, Any] | None:
  """The index of the cache (finished or not) in `out`, None where there is none yet; a directory
  that holds anything else is refused (a tokenizer alone is a cache's first file)."""
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out '{out}' is a file; name a directory for the cache")
  index_path = out / "index.json"
  if not index_path.exists():
    if out.is_dir() and {p.name for p in out.iterdir()} - {"tokenizer.model"}:
      raise ConfigError(f"'{out}' is not empty and holds no token cache; name a new directory")
    return None
  try:
    index = json.loads(index_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    index = None
  if not isinstance(index, dict) or not isinstance(index.get("tokenizer"), dict) or "sha256" not in index["tokenizer"]:
    raise ConfigError(f"'{index_path}' is not a token cache's index; name a new directory")
  return index


def prepare(docs: Any, source: str, tokenizer: Tokenizer, out: str | Path, *, workers: int, shard_docs: int,
            progress: bool = True, text_field: str | None = None) -> dict[str, Any]:
  """Writes (or finishes) the cache of `docs`, the documents of `source` (their records' `text_field`,
  for sources of records), in `out`; returns its index."""
  out = Path(out)
  plan = {"format": FORMAT, "source": source, "text_field": text_field, "documents": len(docs), "shard_docs": shard_docs,
          "tokenizer": {"path": str(tokenizer.path.absolute()), "sha256": tokenizer.sha256}}
  index_path = out / "index.json"
  if old := existing(out):
    old.setdefault("text_field", text_field)  # a cache written before the field was recorded
    differ = [f"{k}: {old.get(k)!r} then, {plan[k]!r} now" for k in ("format", "source", "text_field", "documents", "shard_docs")
              if old.get(k) != plan[k]]
    if old["tokenizer"]["sha256"] != plan["tokenizer"]["sha256"]:
      differ.append(f"tokenizer: {old['tokenizer'].get('path')} then, {tokenizer.path} now (another SHA-256)")
    if differ:
      raise ConfigError(f"'{out}' holds a token cache made otherwise ({'; '.join(differ)}); rerun with those settings, "
                        f"or use another directory")
  model = out / "tokenizer.model"
  if model.is_file() and model.absolute() != tokenizer.path.absolute() and file_digest(model) != plan["tokenizer"]["sha256"]:
    raise ConfigError(f"'{model}' is another tokenizer than {tokenizer.path} (another SHA-256); use another directory, "
                      f"or remove it to have it replaced")
  out.mkdir(parents=True, exist_ok=True)
  for leftover in out.glob("*.tmp*"):  # a shard an interrupted run was writing
    leftover.unlink()
  index_path.write_text(json.dumps({**plan, "complete": False}, indent=2))
  if tokenizer.path.absolute() != model.absolute():
    shutil.copyfile(tokenizer.path, model)
  shards = -(-len(docs) // shard_docs)
  todo = [s for s in range(shards) if not all(p.exists() for p in _shard_paths(out, s))]  # a lost file is written again
  bar = tqdm.tqdm(total=shards, initial=shards - len(todo), unit="shard", disable=not progress, dynamic_ncols=True)
  args = (docs, str(tokenizer.path), out, shard_docs)
  with multiprocessing.get_context("fork").Pool(workers, _start_worker, args) as pool:
    for tokens in pool.imap_unordered(_write_shard, todo):
      bar.update()
      bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
  bar.close()
  counts = [int(np.load(_shard_paths(out, s)[1], mmap_mode="r")[-1]) for s in range(shards)]
  index = {**plan, "complete": True, "tokens": sum(counts), "shard_tokens": counts}
  index_path.write_text(json.dumps(index, indent=2))
  return index


class TokenCache:
  """The cache's documents as uint32 token arrays, read through memory maps."""

  def __init__(self, folder: str | Path):
    self.dir = Path(folder)
    index_path = self.dir / "index.json"
    if not index_path.is_file():
      raise ConfigError(f"data source 'tokens:{folder}' has no index.json; write it with lm-prepare --out {folder}")
    try:
      self.index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
      self.index = None
    if not isinstance(self.index, dict):
      raise ConfigError(f"'{index_path}' is not a token cache's index; rerun the lm-prepare command that wrote it, into a new directory")
    if self.index.get("format") != FORMAT or not self.index.get("complete"):
      raise ConfigError(f"token cache '{folder}' is incomplete; rerun the same lm-prepare command to finish it")
    self._check_shards()
    self.shards: Recent = Recent(OPEN_SHARDS)  # (tokens, offsets), opened on first use

  def _check_shards(self) -> None:
    """Refuses a cache that lost a shard file (a partial copy, say) now, not when training reaches it."""
    there = set(os.listdir(self.dir))  # one listing: a large cache has many thousand shards
    for s in range(-(-self.index["documents"] // self.index["shard_docs"])):
      for path in _shard_paths(self.dir, s):
        if path.name not in there:
          raise ConfigError(f"token cache '{self.dir}' is missing {path}; rerun the lm-prepare command that wrote it, "
                            f"which writes it again")

  @property
  def tokenizer_sha256(self) -> str:
    return self.index["tokenizer"]["sha256"]

  def __len__(self) -> int:
    return self.index["documents"]

  def __getitem__(self, i: int) -> np.ndarray:
    s, k = divmod(i, self.index["shard_docs"])
    tokens, offsets = self.shards.get(s, lambda: self._open(s))
    # A view, not a copy: a long document is read a row's piece at a time (a copy cost the packer a
    # fifth of its speed). A dropped shard's map stays open only while the caller holds its documents.
    return tokens[offsets[k]:offsets[k + 1]]

  def _open(self, s: int) -> tuple[np.ndarray, np.ndarray]:
    tokens_path, offsets_path = _shard_paths(self.dir, s)
    return np.load(tokens_path, mmap_mode="r").view(np.ndarray), np.load(offsets_path)  # plain views: cheaper slices
