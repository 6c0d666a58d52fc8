"""The training loop: data, steps, evaluation, metrics and checkpoints for one run in one work directory.

Rerunning the same command on the same work directory resumes from its newest readable checkpoint.
"""

from __future__ import annotations

import itertools
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm import config, data, distributed, flops, metrics, sharding
from lm.checkpoint import Checkpoints, UnreadableCheckpoint, open_run, run_meta, run_tokenizer
from lm.config import Config, ConfigError
from lm.tokenizer import Tokenizer, train as train_tokenizer
from lm.train import Steps, TrainState

# Settings that may change when a run resumes: schedule, cadences, precision, remat, the attention
# kernel and the mesh.
SAFE_CHANGES = ("train.steps", "train.learning_rate", "train.warmup_steps", "train.min_lr_ratio",
                "train.weight_decay", "train.b1", "train.b2", "train.clip_norm", "train.z_loss",
                "train.grad_accum", "model.dtype", "model.remat", "model.attention", "eval.", "checkpoint.", "log.", "mesh.")


class TrainingError(RuntimeError):
  """Training cannot go on; the message is one line meant for the user."""


def config_changes(saved: dict[str, Any], cfg: Config, keys: tuple[str, ...] | None = None) -> list[str]:
  """`key: old -> new` for every setting that differs (only those starting with `keys`, if given)."""
  old, new = config.flatten(saved), config.flatten(config.to_dict(cfg))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and (keys is None or k.startswith(keys))]


def model_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
  return [c for c in config_changes(saved, cfg, ("model.",)) if not c.startswith(SAFE_CHANGES)]


def prepare_workdir(path: str | Path) -> Path:
  workdir = Path(path)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"work directory '{workdir}' is not writable: {e.strerror or e}") from None
  return workdir


def tokenizer_for(cfg: Config, workdir: Path, docs: Any, inherited: Path | None = None) -> Tokenizer:
  if cfg.tokenizer.path:
    return Tokenizer(cfg.tokenizer.path)
  path = workdir / "tokenizer.model"
  if not path.exists() and inherited is not None:
    if jax.process_index() == 0:
      shutil.copyfile(inherited, path)
    multihost_utils.sync_global_devices("tokenizer copied")
  if path.exists():
    return Tokenizer(path)
  if jax.process_index() == 0:
    train_tokenizer((docs[i] for i in range(len(docs))), cfg.tokenizer, path)
  multihost_utils.sync_global_devices("tokenizer trained")
  return Tokenizer(path)


def resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = tokenizer.vocab_size
  elif cfg.model.vocab_size != tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer's {tokenizer.vocab_size} ({tokenizer.path}); set it to 0 or {tokenizer.vocab_size}")


def parse_init_from(spec: str) -> tuple[Path, int | None]:
  """`OTHER_WORKDIR[:STEP]`."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit():
    return Path(path), int(step)
  return Path(spec), None


def init_from_run(spec: str) -> tuple[Checkpoints, int, dict[str, Any]]:
  """The other run's checkpoints, the chosen step and its description."""
  try:
    return open_run(*parse_init_from(spec))
  except ConfigError as e:
    raise ConfigError(f"--init-from {spec}: {e}") from None


def check_resumable(saved: dict[str, Any], cfg: Config, meta: dict[str, Any], workdir: Path, step: int) -> None:
  """Fails, before anything is loaded, where the checkpoint cannot continue under this config."""
  where = f"cannot resume {workdir} from step {step}"
  if unsafe := [c for c in config_changes(saved["config"], cfg) if not c.startswith(SAFE_CHANGES)]:
    raise ConfigError(f"{where}: {'; '.join(unsafe)} differ from its checkpoint; use a new --workdir (or --init-from {workdir})")
  if saved["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
    raise ConfigError(f"{where}: tokenizer {meta['tokenizer']['path']} is not the one it was trained with ({saved['tokenizer']['path']})")
  if saved["process_count"] != meta["process_count"]:
    raise ConfigError(f"{where}: it was saved by {saved['process_count']} processes, this run has {meta['process_count']}")


def evaluate(steps: Steps, state: TrainState, val_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  nll = tokens = 0.0
  for batch in val_batches:
    out = jax.device_get(steps.eval_step(state.params, steps.shard_batch(batch)))
    nll, tokens = nll + float(out["nll"]), tokens + float(out["tokens"])
  val_loss = nll / max(tokens, 1.0)
  return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}


def roll_back_metrics(workdir: Path, step: int) -> None:
  """Rows after the step we start from are moved aside: they are about to be recomputed."""
  path = workdir / "metrics.jsonl"
  rows = path.read_text().splitlines(keepends=True) if path.exists() else []
  keep = [r for r in rows if metrics.row_step(r) <= step]
  if len(keep) < len(rows):
    with (workdir / "metrics.rolled-back.jsonl").open("a") as f:
      f.writelines(r for r in rows if metrics.row_step(r) > step)
    path.write_text("".join(keep))


class StopRequest:
  """SIGTERM (a preemption notice) or SIGINT (Ctrl-C) asks the loop to save and stop."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum: int, frame: Any) -> None:
    self.received = signum

  def agreed(self) -> bool:
    """True on every process once any process received a signal."""
    asked = self.received is not None
    if jax.process_count() > 1:
      asked = bool(np.max(multihost_utils.process_allgather(np.int32(asked))))
    return asked

  def restore(self) -> None:
    for s, handler in self.previous.items():
      signal.signal(s, handler)


def run(cfg: Config, workdir: str | Path, init_from: str | None = None) -> TrainState:
  workdir = prepare_workdir(workdir)
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  t = cfg.train
  sharding.check_batch(t.batch_size, mesh, cfg.mesh.rules)
  dp = sharding.data_parallel_size(mesh, cfg.mesh.rules)
  if t.batch_size // t.grad_accum % dp:
    raise ConfigError(f"train.batch_size/train.grad_accum={t.batch_size // t.grad_accum} is not divisible by the data-parallel size {dp}")

  ckpts = Checkpoints(workdir / "checkpoints", cfg.checkpoint)
  source = None
  if init_from and not ckpts.steps():
    source = init_from_run(init_from)
  train_docs, val_docs = data.split(cfg.data)
  inherited = run_tokenizer(parse_init_from(init_from)[0], source[2]) if source else data.cache_tokenizer(cfg.data)
  tokenizer = tokenizer_for(cfg, workdir, train_docs, inherited)
  data.check_tokenizer(cfg.data, tokenizer)
  resolve_vocab(cfg, tokenizer)
  distributed.check_same_config(config.to_dict(cfg))
  if source is not None and (changes := model_changes(source[2]["config"], cfg)):
    raise ConfigError(f"--init-from {init_from}: the model differs from that run's ({'; '.join(changes)})")
  if lead:
    config.save(cfg, workdir / "config.yaml")
  meta = run_meta(config.to_dict(cfg), tokenizer.path)

  steps = Steps(cfg, mesh)
  stream = dict(seq_len=t.seq_len, global_batch=t.batch_size, rows=sharding.local_rows(steps.batch_sharding, t.batch_size))
  train_iter = iter(data.batches(train_docs, tokenizer, seed=t.seed, shuffle_window=cfg.data.shuffle_window,
                                 workers=cfg.data.workers, **stream))
  writer = metrics.MetricsWriter(workdir, t.steps, enabled=lead)
  say = writer.say

  state = None
  for step in reversed(ckpts.steps()):
    try:
      saved = ckpts.meta(step)
      check_resumable(saved, cfg, meta, workdir, step)
      state = ckpts.restore(step, steps.abstract_state(), train_iter)
    except UnreadableCheckpoint as e:
      moved = ckpts.set_aside(step) if lead else None
      multihost_utils.sync_global_devices("unreadable checkpoint set aside")
      say(f"{e}; moved it to {moved}; trying the previous checkpoint")
      continue
    if changes := config_changes(saved["config"], cfg):
      say(f"resuming with changed settings: {'; '.join(changes)}")
    say(f"resumed from step {step}")
    break
  if state is None and source is not None:
    other, step, _ = source
    state = steps.state_from_params(other.restore_params(step, steps.abstract_state().params))
    other.close()
    say(f"initialized parameters from {init_from} (step {step}); fresh optimizer at step 0")
  if state is None:
    state = steps.init_state(t.seed)

  start = int(state.step)
  if lead:
    roll_back_metrics(workdir, start)
  val_batches = []
  if val_docs is not None and cfg.eval.steps > 0:
    val_iter = iter(data.batches(val_docs, tokenizer, seed=0, **stream))
    val_batches = list(itertools.islice(val_iter, cfg.eval.steps))
    val_iter.close()

  flops_per_step = flops.flops_per_token(cfg.model, t.seq_len) * t.batch_size * t.seq_len
  peak = flops.peak_flops(mesh.devices.flatten().tolist())
  say(f"model {flops.count_params(cfg.model) / 1e6:.1f}M params | mesh {dict(mesh.shape)} | "
      f"vocab {tokenizer.vocab_size} | {t.batch_size}x{t.seq_len} tokens per step | step {start} of {t.steps}")
  clock = [time.perf_counter(), start]  # time and step of the last logged line

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

  saving = [0]  # the step of the newest save asked for; its errors surface when the next one starts

  def save(done: int) -> None:
    try:
      ckpts.save(done, state, train_iter, meta)
      saving[0] = done
    except Exception as e:
      raise TrainingError(f"checkpoint save at step {saving[0] or done} failed: {' '.join(str(e).split())}") from None

  stop = StopRequest()
  try:
    pending = None
    for step in range(start, t.steps):
      state, step_metrics = steps.train_step(state, steps.shard_batch(next(train_iter)))
      if pending is not None:
        finish(*pending)
      done = step + 1
      pending = (done, step_metrics)
      last, stopping = done == t.steps, stop.agreed()
      evaluate_now = bool(val_batches) and (done % cfg.eval.every == 0 or last)
      save_now = done % cfg.checkpoint.every == 0 or last or stopping
      if evaluate_now or save_now:
        finish(*pending)  # a NaN stops here, before anything is saved
        pending = None
        if save_now:
          save(done)
        if evaluate_now:
          writer.write(done, evaluate(steps, state, val_batches))
        clock[0] = time.perf_counter()
      if stopping:
        say(f"stopped by {signal.Signals(stop.received or signal.SIGTERM).name} at step {done}; checkpoint saved")
        break
  finally:
    stop.restore()
    train_iter.close()
    writer.close()
    try:
      ckpts.close()  # waits for the save in flight
    except Exception as e:
      raise TrainingError(f"checkpoint save at step {saving[0]} failed: {' '.join(str(e).split())}") from None
  if lead:
    metrics.plot(workdir)
  return state
