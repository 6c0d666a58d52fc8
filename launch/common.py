"""What the cluster launchers share: the entry points they start."""

from __future__ import annotations

ENTRY_POINTS = {"train": "launch.train", "sample": "launch.sample"}


def entry_command(remainder: list[str]) -> list[str]:
  """`-- train|sample ARGS` as `[train|sample, ARGS...]`; raises ValueError with a one-line reason."""
  command = remainder[1:] if remainder[:1] == ["--"] else remainder
  if not command or command[0] not in ENTRY_POINTS:
    raise ValueError(f"after --, name one of {', '.join(ENTRY_POINTS)} and its arguments (got {' '.join(command) or 'nothing'})")
  return command


def python_module(command: list[str]) -> list[str]:
  return ["python3", "-m", ENTRY_POINTS[command[0]], *command[1:]]
