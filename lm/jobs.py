"""Sampling jobs on files: prompts in; completions out as they finish, one JSON line each, resumable.

An output file starts with a header line, {"settings": {...}}, naming what produced it (work
directory, checkpoint step, prompts, sampling knobs). A rerun of the same job on the same file skips
the (index, sample) pairs already there, drops a torn last line and appends the rest; a rerun with
other settings refuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, TextIO

from lm import distributed
from lm.config import ConfigError
from lm.formats import malformed, utf8
from lm.sampler import Completion


def read_prompts(path: str) -> list[str]:
  """One JSON object per line with a "prompt" string (a bare JSON string also works)."""
  file = Path(path)
  if file.is_dir() or not file.exists():  # a pipe (/dev/stdin, <(...)) is read as a file is
    raise ConfigError(f"--prompts file '{path}' {'is a directory' if file.is_dir() else 'does not exist'}")
  try:
    text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the first prompt
  except UnicodeDecodeError as e:
    raise ConfigError(f"--prompts file '{path}' is not UTF-8 text (byte {e.start})") from None
  except OSError as e:
    raise ConfigError(f"--prompts file '{path}' cannot be read: {e.strerror or e}") from None
  prompts = []
  for lineno, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028, which splitlines() cuts at
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{lineno}: {malformed(e)}") from None
    prompt = record.get("prompt") if isinstance(record, dict) else record
    if not isinstance(prompt, str):
      raise ConfigError(f"{path}:{lineno}: expected a \"prompt\" string")
    prompts.append(utf8(prompt))
  if not prompts:
    raise ConfigError(f"--prompts file '{path}' has no prompts")
  return prompts


def shared_prompts(path: str) -> list[str]:
  """The prompts every process reads, alike: a host whose copy differs or that cannot read it (its own
  disk) stops them all with one line, where it alone would fail and leave the others waiting."""
  prompts = distributed.all_or_none(read_prompts, path)
  distributed.check_same_config({"prompts": prompts_digest(prompts)})
  return prompts


def prompts_digest(prompts: list[str]) -> str:
  return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


HEADER = b'{"settings": '


def open_output(path: str | Path, settings: dict[str, Any], write: bool = True) -> tuple[TextIO | None, set[tuple[int, int]]]:
  """The output file, opened for appending by the process that writes it (`write`), and the (index,
  sample) pairs it holds. With several processes that one is process 0: it reads the file and tells
  the others what is done (or what is wrong), since a host may have a disk, and a file, of its own."""
  out, done, error = None, set(), None
  if write:
    try:
      out, done = _open_output(Path(path), settings)
    except OSError as e:
      error = f"--output '{path}' cannot be written: {e.strerror or e}"
    except ConfigError as e:
      error = str(e)
  error, pairs = distributed.from_first([error, sorted(done)])
  if error:
    raise ConfigError(error)
  return out, {(index, sample) for index, sample in pairs}


def _open_output(path: Path, settings: dict[str, Any]) -> tuple[TextIO, set[tuple[int, int]]]:
  raw = path.read_bytes() if path.is_file() else b""  # a pipe or a terminal holds nothing to resume
  complete = raw[:raw.rfind(b"\n") + 1]  # a line cut short by a killed run is dropped
  lines = complete.decode(errors="replace").splitlines()  # not UTF-8: not ours, refused below
  done: set[tuple[int, int]] = set()
  if raw and not lines and not HEADER.startswith(raw[:len(HEADER)]):  # no whole line, and not a torn header
    raise ConfigError(f"--output '{path}' exists and is not an lm-sample output; choose a new path")
  if lines:
    try:
      records = [json.loads(line) for line in lines]
      written = records[0]["settings"]
      done = {(r["index"], r.get("sample", 0)) for r in records[1:]}
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ConfigError(f"--output '{path}' exists and is not an lm-sample output; choose a new path") from None
    if written != settings:
      changed = "; ".join(f"{k}: {written.get(k)!r} then, {settings.get(k)!r} now"
                          for k in sorted(written.keys() | settings.keys()) if written.get(k) != settings.get(k))
      raise ConfigError(f"--output '{path}' was written with other settings ({changed}); rerun with those or choose a new path")
  if len(complete) != len(raw):
    with path.open("r+b") as f:
      f.truncate(len(complete))
  out = path.open("a")
  if not lines:
    out.write(json.dumps({"settings": settings}) + "\n")  # starts with HEADER
    out.flush()
  return out, done


def record(c: Completion, with_sample: bool) -> str:
  row = {"index": c.index} | ({"sample": c.sample} if with_sample else {})
  row |= {"prompt": c.prompt, "completion": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
  return json.dumps(row | ({"logprobs": c.logprobs} if c.logprobs is not None else {})) + "\n"


class Sink:
  """Completions as they finish, one flushed JSON line each, written by one process (`out` is None on
  the others). A write that fails (a full disk) is kept as `failure` and nothing more is written:
  every process stops on it together at its next `check`, where one that stopped alone would leave
  the others waiting for it."""

  def __init__(self, out: TextIO | None, path: str | None, with_sample: bool):
    self.out, self.path, self.with_sample = out, path, with_sample
    self.failure: str | None = None
    self.reader_gone = False  # stdout's reader (`| head`): the job ends quietly, as a shell tool does

  def write(self, c: Completion) -> None:
    if self.out is None or self.failure:
      return
    try:
      self.out.write(record(c, self.with_sample))
      self.out.flush()
    except BrokenPipeError:
      self.failure, self.reader_gone = "the reader of the completions (stdout) has gone", True
    except OSError as e:
      kept = f"; {self.path} holds the completions made so far, and the same command makes the rest" if self.path else ""
      self.failure = f"writing the completions to {self.path or 'stdout'} failed ({e.strerror or e}){kept}"
      with contextlib.suppress(OSError):
        self.out.close()  # its buffer, cut short, is not written again at exit

  def check(self) -> None:
    if self.failure:
      raise ConfigError(self.failure)


class Progress:
  """A one-line bar on a terminal: completions done, kept tokens per second of decoding."""

  def __init__(self, total: int, stream: TextIO, shown: bool):
    self.total, self.done, self.stream, self.shown = total, 0, stream, shown
    self.last = 0.0

  def update(self, tokens: int, seconds: float) -> None:
    self.done += 1
    now = time.monotonic()
    if not self.shown or (now - self.last < 0.2 and self.done < self.total):
      return
    self.last = now
    filled = 30 * self.done // max(self.total, 1)
    self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} completions, "
                      f"{tokens / max(seconds, 1e-9):,.0f} tokens/s")
    if self.done == self.total:
      self.stream.write("\n")
    self.stream.flush()
