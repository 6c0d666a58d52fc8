"""Writing without losing anything: a directory tried before long work, a file replaced whole."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from lm.config import ConfigError


def writable_dir(path: Path, what: str) -> Path:
  """`path` made (with its parents) and written to once: a command that could not write there stops
  in one line before its long work, not with a traceback after it."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"  # hosts sharing the directory each their own
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"{what} '{path}' is not writable: {e.strerror or e}") from None
  return path


def write_file(path: Path, data: bytes) -> None:
  """Whole or not at all: a process killed while writing leaves no cut-short file to be taken up later."""
  path.parent.mkdir(parents=True, exist_ok=True)
  part = path.with_name(f"{path.name}.part{os.getpid()}")
  try:
    part.write_bytes(data)
    part.replace(path)
  finally:
    part.unlink(missing_ok=True)  # what a full disk or Ctrl-C left of it
