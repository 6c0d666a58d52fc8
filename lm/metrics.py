"""Metrics: JSON lines, TensorBoard events, a console progress view and the loss plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import tqdm
from tensorboardX import SummaryWriter

from lm.config import ConfigError


class MetricsWriter:
  """Writes only where `enabled` (process 0), so several hosts never write the same files. Metrics
  are written from `begin` on, once the run knows the step it starts from. A write that fails (a full
  disk) is kept as `failure`, and nothing more is written: the loop stops every process with it at a
  step they all agree on (one that raised alone would leave the others waiting for it)."""

  def __init__(self, workdir: Path, total_steps: int, enabled: bool = True):
    self.enabled, self.workdir, self.total = enabled, workdir, total_steps
    self.path = workdir / "metrics.jsonl"
    self.tb: SummaryWriter | None = None
    self.bar = None
    self.failure: str | None = None

  def begin(self, start: int) -> None:
    """From step `start`: TensorBoard hides what an earlier run logged after it (those steps are
    about to be recomputed, as metrics.jsonl's rows are rolled back), and the bar counts from it."""
    if not self.enabled:
      return
    self.tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=start + 1)
    if sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=self.total, initial=start, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled or self.failure:
      return
    try:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
      for name, value in metrics.items():
        self.tb.add_scalar(name, value, step)
      self.tb.flush()
    except OSError as e:  # a full disk, storage gone: one line, and the checkpoints on disk serve a rerun
      self.failure = (f"writing the metrics of step {step} to {self.workdir} failed ({e.strerror or e}); free the space "
                      f"(or restore access) and rerun the same command to go on from the newest checkpoint")
      return
    self.show(step, metrics)

  def check(self) -> None:
    if self.failure:
      raise ConfigError(self.failure)

  def show(self, step: int, metrics: dict[str, float]) -> None:
    parts = []
    if "loss" in metrics:
      parts += [f"loss {metrics['loss']:.4f}", f"lr {metrics['learning_rate']:.2e}"]
    if "tokens_per_sec" in metrics:
      parts.append(f"{metrics['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in metrics:
      parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    if "val_loss" in metrics:
      parts += [f"val_loss {metrics['val_loss']:.4f}", f"val_ppl {metrics['val_perplexity']:.2f}"]
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix_str(" | ".join(parts), refresh=True)
    else:
      print(f"step {step} | " + " | ".join(parts), flush=True)

  def say(self, line: str) -> None:
    if self.enabled:
      (self.bar.write if self.bar is not None else print)(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


class StepClock:
  """Seconds spent in training steps between logged lines. It runs only between `start` and `pause`:
  evaluation, saving and the first step after a start (compilation) are left out."""

  def __init__(self, step: int):
    self.step, self.seconds, self.since = step, 0.0, None

  def start(self, step: int | None = None) -> None:
    """From now on; `step`: the steps before it are not timed."""
    self.since = time.perf_counter()
    if step is not None:
      self.step, self.seconds = step, 0.0

  def pause(self) -> None:
    """Once every step dispatched so far has finished."""
    if self.since is not None:
      self.seconds += time.perf_counter() - self.since
      self.since = None

  def lap(self, step: int) -> tuple[int, float]:
    """Steps and seconds timed since the last lap; the clock keeps running."""
    running = self.since is not None
    self.pause()
    steps, seconds = step - self.step, self.seconds
    self.step, self.seconds = step, 0.0
    if running:
      self.start()
    return steps, seconds


def row_step(line: str) -> int:
  """A metrics row's step; -1 for a line that is none (garbled, as by a disk fault)."""
  try:
    step = json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return -1
  return step if isinstance(step, int) else -1


def read(path: Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot(workdir: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read(workdir / "metrics.jsonl")
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
  val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  for points, label in ((train, "train"), (val, "validation")):
    if points:
      ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
  ax.set(xlabel="step", ylabel="loss (nats per token)", title=workdir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  out = workdir / "loss.png"
  fig.savefig(out, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return out
