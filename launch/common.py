"""What the cluster launchers share: the entry points they start."""

from __future__ import annotations

import argparse

ENTRY_POINTS = {"train": "launch.train", "sample": "launch.sample"}


def entry_command(parser: argparse.ArgumentParser, remainder: list[str]) -> list[str]:
  """`-- train|sample ARGS` as `[train|sample, ARGS...]`; anything else exits 2 with one line."""
  command = remainder[1:] if remainder[:1] == ["--"] else remainder
  if not command or command[0] not in ENTRY_POINTS:
    parser.exit(2, f"error: after --, name one of {', '.join(ENTRY_POINTS)} and its arguments (got {' '.join(command) or 'nothing'})\n")
  return command


def python_module(command: list[str], python: str = "python3") -> list[str]:
  return [python, "-m", ENTRY_POINTS[command[0]], *command[1:]]
