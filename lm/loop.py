"""The training loop: data, steps, evaluation and metrics for one run in one work directory."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import jax
import numpy as np

from lm import config, data, flops, metrics, sharding
from lm.config import Config, ConfigError
from lm.tokenizer import Tokenizer, train as train_tokenizer
from lm.train import Steps, TrainState


class TrainingError(RuntimeError):
  """Training cannot go on; the message is one line meant for the user."""


def tokenizer_for(cfg: Config, workdir: Path, docs) -> Tokenizer:
  if cfg.tokenizer.path:
    return Tokenizer(cfg.tokenizer.path)
  path = workdir / "tokenizer.model"
  if path.exists():
    return Tokenizer(path)
  return train_tokenizer((docs[i] for i in range(len(docs))), cfg.tokenizer, path)


def resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = tokenizer.vocab_size
  elif cfg.model.vocab_size != tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer's {tokenizer.vocab_size} ({tokenizer.path}); set it to 0 or {tokenizer.vocab_size}")


def evaluate(steps: Steps, state: TrainState, val_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  nll = tokens = 0.0
  for batch in val_batches:
    out = jax.device_get(steps.eval_step(state.params, steps.shard_batch(batch)))
    nll, tokens = nll + float(out["nll"]), tokens + float(out["tokens"])
  val_loss = nll / max(tokens, 1.0)
  return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}


def run(cfg: Config, workdir: str | Path) -> TrainState:
  workdir = Path(workdir)
  if (workdir / "metrics.jsonl").exists():
    raise ConfigError(f"work directory '{workdir}' already holds a run (metrics.jsonl); choose a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.mesh.rules)
  if cfg.train.batch_size // cfg.train.grad_accum % sharding.data_parallel_size(mesh, cfg.mesh.rules):
    raise ConfigError(f"train.batch_size/train.grad_accum={cfg.train.batch_size // cfg.train.grad_accum} is not divisible by the data-parallel size {sharding.data_parallel_size(mesh, cfg.mesh.rules)}")
  train_docs, val_docs = data.split(cfg.data)
  tokenizer = tokenizer_for(cfg, workdir, train_docs)
  resolve_vocab(cfg, tokenizer)
  if lead:
    config.save(cfg, workdir / "config.yaml")

  steps = Steps(cfg, mesh)
  state = steps.init_state(cfg.train.seed)
  t = cfg.train
  stream = dict(seq_len=t.seq_len, global_batch=t.batch_size, process_index=jax.process_index(),
                process_count=jax.process_count())
  train_iter = iter(data.batches(train_docs, tokenizer, seed=t.seed, shuffle_window=cfg.data.shuffle_window, **stream))
  val_batches = []
  if val_docs is not None and cfg.eval.steps > 0:
    val_iter = iter(data.batches(val_docs, tokenizer, seed=0, **stream))
    val_batches = list(itertools.islice(val_iter, cfg.eval.steps))
    val_iter.close()

  flops_per_step = flops.flops_per_token(cfg.model, t.seq_len) * t.batch_size * t.seq_len
  peak = flops.peak_flops(mesh.devices.flatten().tolist())
  writer = metrics.MetricsWriter(workdir, t.steps, enabled=lead)
  writer.say(f"model {flops.count_params(cfg.model) / 1e6:.1f}M params | mesh {dict(mesh.shape)} | "
             f"vocab {tokenizer.vocab_size} | {t.batch_size}x{t.seq_len} tokens per step")

  clock = [time.perf_counter(), int(state.step)]  # time and step of the last logged line

  def finish(done: int, step_metrics: dict[str, jax.Array]) -> None:
    """Checks and logs a step's metrics; called once the next step is already queued."""
    loss = float(step_metrics["loss"])
    if not math.isfinite(loss):
      raise TrainingError(f"loss became {loss} at step {done}; training stopped, nothing more was saved")
    if done % cfg.log.every and done != t.steps:
      return
    elapsed, steps_done = time.perf_counter() - clock[0], done - clock[1]
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "tokens"}
    m["tokens_per_sec"] = steps_done * t.batch_size * t.seq_len / elapsed
    m["mfu"] = steps_done * flops_per_step / elapsed / peak
    writer.write(done, m)
    clock[:] = [time.perf_counter(), done]

  try:
    pending = None
    for step in range(int(state.step), t.steps):
      state, step_metrics = steps.train_step(state, steps.shard_batch(next(train_iter)))
      if pending is not None:
        finish(*pending)
      pending = (step + 1, step_metrics)
      if val_batches and (step + 1) % cfg.eval.every == 0 or step + 1 == t.steps:
        finish(*pending)
        pending = None
        if val_batches:
          writer.write(step + 1, evaluate(steps, state, val_batches))
        clock[0] = time.perf_counter()
  finally:
    train_iter.close()
    writer.close()
  if lead:
    metrics.plot(workdir)
  return state
