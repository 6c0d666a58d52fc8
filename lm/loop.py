"""The training loop: data, steps, evaluation, metrics and checkpoints for one run in one work directory.

Rerunning the same command on the same work directory resumes from its newest readable checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm import config, data, distributed, flops, metrics, resume, sharding
from lm.checkpoint import Checkpoints, run_meta, run_step, run_tokenizer
from lm.config import Config, ConfigError
from lm.files import writable_dir, write_file
from lm.model import count_params
from lm.tokenizer import Tokenizer, check_trained_as, file_digest, train as train_tokenizer
from lm.train import Steps, TrainState


class TrainingError(RuntimeError):
  """Training cannot go on; the message is one line meant for the user."""


def prepare_workdir(path: str | Path) -> Path:
  if not str(path).strip():
    raise ConfigError("--workdir is empty")  # Path("") would be the current directory
  return writable_dir(Path(path), "work directory")


def sources(cfg: Config, init_from: str | None, source: tuple[Checkpoints, int, dict[str, Any]] | None
            ) -> tuple[Any, Any | None, Path | None]:
  """The training and held-out documents, and the tokenizer the run inherits (the --init-from run's,
  a token cache's), as this process finds them."""
  train_docs, val_docs = data.split(cfg.data)
  inherited = run_tokenizer(run_step(init_from)[0], *source[1:]) if source else data.cache_tokenizer(cfg.data)
  return train_docs, val_docs, inherited


def tokenizer_for(cfg: Config, workdir: Path, docs: Any, inherited: Path | None = None, fresh: bool = True,
                  saved: dict[str, Any] | None = None) -> Tokenizer:
  """The given tokenizer, else the work directory's (copied from `inherited`, or trained here by an
  earlier attempt at a `fresh` run: then with these settings), else one trained now. `saved`: the
  newest checkpoint's description, where a resume can read it. Process 0 decides what exists, for all:
  a process that looked at other files would take other branches, around other collectives."""
  path = workdir / "tokenizer.model"
  if distributed.from_first(bool(saved) and copy_instead(cfg, path, saved)):
    return distributed.all_or_none(Tokenizer, path)
  if cfg.tokenizer.path:
    tokenizer = distributed.all_or_none(Tokenizer, cfg.tokenizer.path)
    # The run keeps a copy, which outlives a moved original; a fresh run's replaces an earlier attempt's.
    if jax.process_index() == 0 and (not path.exists() or fresh and file_digest(path) != tokenizer.sha256):
      write_file(path, tokenizer.path.read_bytes())
    return tokenizer
  exists = distributed.from_first(path.exists())
  # a fresh run's earlier attempt may have trained one of its own (process 0's file decides); a resumed
  # run keeps its copy, which the resume checks
  stale = fresh and jax.process_index() == 0 and exists and inherited is not None and file_digest(path) != file_digest(inherited)
  if inherited is not None and (not exists or distributed.from_first(stale)):
    if jax.process_index() == 0:
      write_file(path, inherited.read_bytes())
    multihost_utils.sync_global_devices("tokenizer copied")
  if not exists and inherited is None:
    distributed.all_or_none(train_on_first, docs, cfg.tokenizer, path)
  tokenizer = distributed.all_or_none(Tokenizer, path)
  if exists and fresh and inherited is None:  # a run with checkpoints has the resume checks instead
    check_trained_as(tokenizer, cfg.tokenizer)
  return tokenizer


def train_on_first(docs: Any, cfg: config.TokenizerConfig, path: Path) -> None:
  """Process 0 trains the run's tokenizer (the others read it once it is written)."""
  if jax.process_index() == 0:
    try:
      train_tokenizer(data.every_document(docs), cfg, path)
    except OSError as e:
      raise ConfigError(f"writing the tokenizer {path} failed: {e.strerror or e}") from None


def copy_instead(cfg: Config, copy: Path, saved: dict[str, Any]) -> bool:
  """Resuming with the run's own tokenizer.path setting, where that file is gone or was retrained in
  place: the run's copy, if it is the tokenizer the checkpoint recorded. (A tokenizer.path changed
  since, a moved file's new place, is taken as it is, and the resume checks its SHA-256.)"""
  recorded, given = saved["tokenizer"]["sha256"], Path(cfg.tokenizer.path).expanduser()
  return (bool(cfg.tokenizer.path) and saved["config"]["tokenizer"]["path"] == cfg.tokenizer.path
          and copy.exists() and file_digest(copy) == recorded and not (given.exists() and file_digest(given) == recorded))


def newest_meta(ckpts: Checkpoints) -> dict[str, Any] | None:
  """The newest checkpoint's description, None where there is none or it cannot be read (the resume says why)."""
  try:
    return ckpts.meta(ckpts.steps()[-1]) if ckpts.steps() else None
  except ConfigError:
    return None


def resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
  """0 takes the tokenizer's size; a larger vocabulary is padding (a converted model's, or rows rounded
  up for sharding) that the data never uses."""
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = tokenizer.vocab_size
  elif cfg.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ({tokenizer.path}); set it to 0 or at least {tokenizer.vocab_size}")


def due(done: int, every: int) -> bool:
  """Whether a cadence falls on this step; 0 never does (the last step is handled by the caller)."""
  return every > 0 and done % every == 0


def evaluate(steps: Steps, state: TrainState, val_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  nll = tokens = 0.0
  for batch in val_batches:
    out = jax.device_get(steps.eval_step(state.params, steps.shard_batch(batch)))
    nll, tokens = nll + float(out["nll"]), tokens + float(out["tokens"])
  val_loss = nll / max(tokens, 1.0)
  return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}


def roll_back_metrics(workdir: Path, step: int) -> None:
  """Rows after the step we start from are moved aside: they are about to be recomputed. So are a
  last row cut short by a killed run, and lines that are no rows."""
  path = workdir / "metrics.jsonl"
  rows = path.read_text().splitlines(keepends=True) if path.exists() else []
  keep = [r for r in rows if r.endswith("\n") and 0 <= metrics.row_step(r) <= step]
  if len(keep) < len(rows):
    with (workdir / "metrics.rolled-back.jsonl").open("a") as f:
      f.writelines(r if r.endswith("\n") else r + "\n" for r in rows if r not in keep)
    write_file(path, "".join(keep).encode())  # whole: a kill or a full disk midway would lose every row kept


def record_start(cfg: Config, workdir: Path, start: int) -> None:
  """Process 0 writes the settings the checkpoint accepted and rolls the metrics back to `start`."""
  if jax.process_index() == 0:
    try:
      config.save(cfg, workdir / "config.yaml")
      roll_back_metrics(workdir, start)
    except OSError as e:
      raise ConfigError(f"writing to {workdir} failed ({e.strerror or e}); free the space (or restore access) and rerun") from None
    except UnicodeDecodeError:
      raise ConfigError(f"{workdir / 'metrics.jsonl'} is not text; move it aside and rerun") from None


class StopRequest:
  """SIGTERM (a preemption notice) or SIGINT (Ctrl-C) asks the loop to save and stop. Before `training`
  either ends the process at once, as it would without us (there is nothing to save), except a SIGTERM
  across processes, which waits for the first agreed step: there JAX's preemption service would take
  it and drop it, and the run trained on until killed."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self.training = False
    self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum: int, frame: Any) -> None:
    if not self.training and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if not self.training and jax.process_count() == 1:  # as if we were not listening yet
      signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
      signal.raise_signal(signum)
      signal.signal(signum, self._handle)
      return
    self.received = signum

  def agreed(self, waits_anyway: bool, *checks: Callable[[], None]) -> bool:
    """True on every process, at the same step, once any process received a signal; where a check
    raises on any process (process 0 could not write the metrics), its error on every one. Across
    processes that takes all-gathers, which wait for the step in flight, so it is asked only every
    `log.every` steps (every step when that is 0) and at steps that evaluate or save (which wait
    anyway); a step between says no."""
    if jax.process_count() == 1:
      run_all(checks)
      return self.received is not None
    if not waits_anyway:
      return False
    distributed.all_or_none(run_all, checks)
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.received is not None))))

  def restore(self) -> None:
    for s, handler in self.previous.items():
      signal.signal(s, handler)


def run_all(checks: tuple[Callable[[], None], ...]) -> None:
  for check in checks:
    check()


class Feed:
  """The training batches. A data error (a malformed record) on one process of several must not end it
  alone: the others would wait for it in the step's collectives until JAX's heartbeat ended them. That
  process feeds rows of padding instead, outside the loss, and its error ends every process at their
  next agreed step, before anything more is saved."""

  def __init__(self, batches: Any, rows: int, seq_len: int):
    self.batches, self.error, self.ahead = batches, None, None
    self.padding = data.padding_batch(rows, seq_len)

  def __next__(self) -> dict[str, np.ndarray]:
    if self.ahead is None:
      return self._fetch()
    (_, batch), self.ahead = self.ahead, None
    if isinstance(batch, Exception):
      raise batch
    return batch

  def peek(self) -> None:
    """Fetches the next batch now; `get_state` still gives the position before it, and a failed read
    is raised by the `next` that takes it (after this step is saved)."""
    position = self.batches.get_state()
    try:
      batch = self._fetch()
    except Exception as e:  # a malformed record, a storage error: this step's checkpoint comes first
      batch = e
    self.ahead = (position, batch)

  def get_state(self) -> Any:
    return self.batches.get_state() if self.ahead is None else self.ahead[0]

  def _fetch(self) -> dict[str, np.ndarray]:
    if self.error is None:
      try:
        return next(self.batches)
      except ConfigError as e:
        if jax.process_count() == 1:
          raise
        self.error = e
    return self.padding

  def check(self) -> None:
    if self.error is not None:
      raise self.error


class Profile:
  """A jax.profiler trace of `profile.steps` steps from `profile.start_step`, in WORKDIR/profile/process_N,
  for TensorBoard's profile plugin or XProf; only process 0 traces unless `profile.all_processes`."""

  def __init__(self, cfg: config.ProfileConfig, workdir: Path):
    self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
    self.on = cfg.steps > 0 and (cfg.all_processes or jax.process_index() == 0)
    self.dir = workdir / "profile" / f"process_{jax.process_index()}"
    self.tracing = False

  def before(self, step: int) -> None:
    if self.on and step == self.first:
      jax.profiler.start_trace(str(self.dir))
      self.tracing = True

  def after(self, step: int, state: TrainState) -> None:
    if self.tracing and step == self.last:
      jax.block_until_ready(state)  # the trace holds the last traced step's device work
      self.stop()

  def stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


class StepLog:
  """Checks every step's loss and writes every `log.every`-th step's metrics, with the throughput since the last."""

  def __init__(self, cfg: Config, writer: metrics.MetricsWriter, start: int, peak: float | None):
    self.every, self.last = cfg.log.every, cfg.train.steps
    self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    self.flops_per_step = flops.flops_per_token(cfg.model, cfg.train.seq_len) * self.tokens_per_step
    self.writer, self.peak = writer, peak
    self.clock = metrics.StepClock(start)

  def __call__(self, done: int, step_metrics: dict[str, jax.Array]) -> None:
    """Called once the next step is fetched and queued: reading the loss does not stall the device, and
    each line's time holds as many fetches as steps."""
    # The loss is that of the parameters before the step; inf or NaN gradients poison the ones after it.
    for name, key in (("loss", "loss"), ("gradient norm", "grad_norm")):
      if not math.isfinite(value := float(step_metrics[key])):
        raise TrainingError(f"{name} became {value} at step {done}; training stopped, nothing more was saved")
    if not due(done, self.every) and done != self.last:
      return
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "tokens"}
    steps_done, seconds = self.clock.lap(done)
    if steps_done and seconds > 0:  # no steps when only the first, with its compilation, ran since the last line
      m["tokens_per_sec"] = steps_done * self.tokens_per_step / seconds
      if self.peak:
        m["mfu"] = steps_done * self.flops_per_step / seconds / self.peak
    self.writer.write(done, m)


class Saves:
  """Asynchronous checkpoint saves: a failed save surfaces, as one line, when the next starts or at close."""

  def __init__(self, ckpts: Checkpoints, meta: dict[str, Any]):
    self.ckpts, self.meta, self.asked = ckpts, meta, 0

  def save(self, step: int, state: TrainState, data_iter: Any) -> None:
    try:
      self.ckpts.save(step, state, data_iter, self.meta)
    except Exception as e:
      raise self._failed(self.asked or step, e) from None
    self.asked = step

  def wait(self) -> None:
    """For the save in flight."""
    self._reporting(self.ckpts.wait)

  def close(self) -> None:
    """Waits for the save in flight."""
    self._reporting(self.ckpts.close)

  def _reporting(self, fn: Callable[[], None]) -> None:
    try:
      fn()
    except Exception as e:
      raise self._failed(self.asked, e) from None

  @staticmethod
  def _failed(step: int, e: Exception) -> TrainingError:
    return TrainingError(f"checkpoint save at step {step} failed: {' '.join(str(e).split())}")


def start_state(steps: Steps, ckpts: Checkpoints, source: tuple[Checkpoints, int, dict[str, Any]] | None,
                init_from: str | None, cfg: Config, meta: dict[str, Any], workdir: Path, data_iter: Any,
                say: Callable[[str], None], resuming: bool) -> TrainState:
  """This run's newest readable checkpoint, else the --init-from run's parameters, else a fresh init."""
  abstract = steps.abstract_state()
  state = resume.restore_newest(ckpts, cfg, meta, workdir, abstract, data_iter, say)
  # A run whose checkpoints were all unreadable (storage that failed for a while, say) does not start
  # again from random weights, or switch to --init-from, unasked.
  if state is None and resuming:
    start = f"from --init-from {init_from}" if init_from else "afresh, from step 0"
    raise ConfigError(f"every checkpoint in {workdir} was unreadable and is set aside in checkpoints_unreadable/; "
                      f"rerun the same command to start {start}")
  if state is None and source is not None:
    other, step, _ = source
    state = steps.state_from_params(other.restore_params(step, abstract.params))
    other.close()
    say(f"initialized parameters from {init_from} (step {step}); fresh optimizer at step 0")
  return state if state is not None else steps.init_state(cfg.train.seed)


def validation_batches(cfg: Config, val_docs: Any, tokenizer: Tokenizer, stream: dict[str, int]) -> list[dict[str, np.ndarray]]:
  if val_docs is None or cfg.eval.steps == 0:
    return []
  return data.held_out_batches(val_docs, tokenizer, limit=cfg.eval.steps, **stream)


def run(cfg: Config, workdir: str | Path, init_from: str | None = None) -> TrainState:
  workdir = prepare_workdir(workdir)
  if init_from is not None and not init_from.strip():
    raise ConfigError("--init-from is empty; name another run's work directory (OTHER_WORKDIR[:STEP])")
  mesh = sharding.make_mesh(cfg.mesh)
  t = cfg.train
  sharding.check_batch(t.batch_size, mesh, cfg.mesh.rules)
  dp = sharding.data_parallel_size(mesh, cfg.mesh.rules)
  if t.batch_size // t.grad_accum % dp:
    raise ConfigError(f"train.batch_size/train.grad_accum={t.batch_size // t.grad_accum} is not divisible by the data-parallel size {dp}")

  ckpts, stop = Checkpoints(workdir / "checkpoints", cfg.checkpoint), StopRequest()
  try:
    return _setup_and_train(cfg, workdir, init_from, mesh, ckpts, stop)
  except BaseException:
    ckpts.close()  # its background threads would otherwise outlive the error line with a traceback
    raise
  finally:
    stop.restore()


def _setup_and_train(cfg: Config, workdir: Path, init_from: str | None, mesh: Any, ckpts: Checkpoints,
                     stop: StopRequest) -> TrainState:
  t, lead = cfg.train, jax.process_index() == 0
  # Process 0's listing, for all: a host whose listing lags would take other branches around collectives.
  resuming = distributed.from_first(bool(ckpts.steps()))
  source = resume.init_from_run(init_from) if init_from and not resuming else None
  train_docs, val_docs, inherited = distributed.all_or_none(sources, cfg, init_from, source)
  tokenizer = tokenizer_for(cfg, workdir, train_docs, inherited, fresh=not resuming, saved=newest_meta(ckpts) if resuming else None)
  documents = data.document_counts(train_docs, val_docs)
  # and the same data and tokenizer: a host whose listing lags (a shard still being copied) would read
  # other documents, one with its own file at tokenizer.path would cut them into other tokens
  distributed.check_same_config(config.to_dict(cfg) | {"documents": documents, "tokenizer_sha256": tokenizer.sha256})
  data.check_tokenizer(cfg.data, tokenizer)
  resolve_vocab(cfg, tokenizer)
  meta = run_meta(config.to_dict(cfg), tokenizer.path)
  if source is not None:
    resume.check_init_from(init_from, source[2], cfg, meta)

  steps = Steps(cfg, mesh)
  meta["rows"] = sharding.process_rows(steps.batch_sharding, t.batch_size)
  meta["documents"] = documents
  stream = dict(seq_len=t.seq_len, global_batch=t.batch_size, rows=sharding.local_rows(steps.batch_sharding, t.batch_size))
  window = data.shuffle_window(cfg.data, t.batch_size, t.seq_len)
  train_iter = iter(data.batches(train_docs, tokenizer, seed=t.seed, shuffle_window=window, workers=cfg.data.workers, **stream))
  writer = metrics.MetricsWriter(workdir, t.steps, enabled=lead)
  if cfg.tokenizer.path and tokenizer.path != Path(cfg.tokenizer.path).expanduser():
    writer.say(f"tokenizer.path {cfg.tokenizer.path} is gone or retrained since this run was trained with it; "
               f"it goes on with its copy, {tokenizer.path}")
  if cfg.data.workers and data.token_ids(train_docs):
    writer.say(f"data.workers={cfg.data.workers} is not used: token caches are packed in the training process, faster than in workers")
  state = start_state(steps, ckpts, source, init_from, cfg, meta, workdir, train_iter, writer.say, resuming)
  start = int(state.step)
  if init_from and source is None:
    writer.say(f"--init-from {init_from} is not used: {workdir} has checkpoints of its own, so it resumes from them")
  if start >= t.steps:
    writer.say(f"nothing to train: the run is at step {start} and train.steps={t.steps}")
  elif cfg.profile.steps and cfg.profile.start_step <= start:
    writer.say(f"profile.start_step={cfg.profile.start_step} is not after step {start}, where this run resumes: "
               f"nothing is traced (set a later step)")
  elif cfg.profile.steps and cfg.profile.start_step > t.steps:
    writer.say(f"profile.start_step={cfg.profile.start_step} is after train.steps={t.steps}: nothing is traced (set an earlier step)")
  distributed.all_or_none(record_start, cfg, workdir, start)
  writer.begin(start)
  val_batches = validation_batches(cfg, val_docs, tokenizer, stream)
  writer.say(f"model {count_params(cfg.model) / 1e6:.1f}M params | mesh {dict(mesh.shape)} | "
             f"vocab {tokenizer.vocab_size} | {t.batch_size}x{t.seq_len} tokens per step | step {start} of {t.steps}")
  peak = flops.peak_flops(mesh.devices.flatten().tolist())
  if peak is None:
    writer.say(f"peak FLOP/s of {mesh.devices.flat[0].device_kind} is unknown (lm/flops.py PEAK_FLOPS); MFU is not reported")
  elif mesh.devices.flat[0].platform == "cpu":
    writer.say(f"mfu is against this machine's float32 matmul rate, measured now: {peak / 1e9:.1f} GFLOP/s (lower while it is busy)")
  log = StepLog(cfg, writer, start, peak)
  saves, profile = Saves(ckpts, meta), Profile(cfg.profile, workdir)
  feed = Feed(train_iter, len(stream["rows"]), t.seq_len)
  stop.training = True
  try:
    state = train(cfg, steps, state, feed, val_batches, log, saves, stop, profile)
  finally:
    profile.stop()
    train_iter.close()
    writer.close()
    saves.close()  # the last save is written before a second notice can end the process
  stop.training = False  # a Ctrl-C while the loss is plotted interrupts it
  if lead:
    try:
      metrics.plot(workdir)
    except OSError as e:  # the run is trained and saved: say so, and what is missing
      writer.say(f"the loss plot {workdir / 'loss.png'} could not be written ({e.strerror or e}); metrics.jsonl holds its numbers")
  return state


def train(cfg: Config, steps: Steps, state: TrainState, feed: Feed, val_batches: list[dict[str, np.ndarray]],
          log: StepLog, saves: Saves, stop: StopRequest, profile: Profile) -> TrainState:
  """Steps until `train.steps` or a stop request. A step's metrics are read once the next step is
  fetched and queued, so reading them does not stall the device, and each line's time holds as many
  batch fetches as steps (a step that evaluates or saves fetches the next batch first; the last line
  has no next batch: where fetching bounds the run, its throughput reads high)."""
  pending, start, began = None, int(state.step), time.perf_counter()
  for step in range(start, cfg.train.steps):
    done = step + 1
    profile.before(done)
    state, step_metrics = steps.train_step(state, steps.shard_batch(next(feed)))
    profile.after(done, state)
    if step == start:  # compiles first: timed on its own, and left out of tokens/s
      jax.block_until_ready(step_metrics)
      log.writer.say(f"step {done} took {time.perf_counter() - began:.1f}s with its compilation (left out of tokens/s)")
      log.clock.start(done)
    elif step == start + 1:  # from where the compiled step's line would lap
      log.clock.start(step)
    if pending is not None:
      log(*pending)
    pending = (done, step_metrics)
    last = done == cfg.train.steps
    evaluate_now = bool(val_batches) and (due(done, cfg.eval.every) or last)
    save_now = due(done, cfg.checkpoint.every) or last
    stopping = stop.agreed(evaluate_now or save_now or due(done, cfg.log.every or 1), feed.check, log.writer.check)  # log.every=0: every step
    save_now = save_now or stopping
    if evaluate_now or save_now:
      if not (last or stopping):
        feed.peek()
      log(*pending)  # a NaN stops here, before anything is saved
      pending = None
      log.clock.pause()
      if save_now:
        saves.save(done, state, feed)
      if evaluate_now:
        log.writer.write(done, evaluate(steps, state, val_batches))
      log.clock.start()
    if stopping:
      saves.wait()
      log.writer.say(f"stopped by {signal.Signals(stop.received or signal.SIGTERM).name} at step {done}; checkpoint saved")
      break
  distributed.all_or_none(log.writer.check)  # the last step's rows
  return state
