"""The real trainer, run as a user runs it: python -m launch.train."""

import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from lm import config, data, flops, loop, metrics
from lm.config import ConfigError
from tests.conftest import ROOT, run_trainer, tiny_overrides, trainer_command


class Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_a_torn_metrics_row_is_set_aside_with_the_rolled_back_ones(tmp_path):
  rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)]
  (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 40, "lo')  # a kill mid-write
  loop.roll_back_metrics(tmp_path, 20)
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
  assert (tmp_path / "metrics.rolled-back.jsonl").read_text() == rows[2] + '{"step": 40, "lo\n'


def test_an_empty_workdir_or_init_from_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="^--workdir is empty$"):
    loop.prepare_workdir("")
  with pytest.raises(ConfigError, match=r"^--init-from is empty; name another run's work directory \(OTHER_WORKDIR\[:STEP\]\)$"):
    loop.run(config.load("configs/tiny.yaml"), tmp_path / "run", init_from="")


def test_a_tokenizer_an_earlier_attempt_trained_is_reused_only_with_the_same_settings(tmp_path, tokenizer):
  docs = [data.TextFiles(data.stdlib_files())[i] for i in range(0, 600, 7)]
  cfg = config.load("configs/tiny.yaml", ["tokenizer.vocab_size=400", "tokenizer.train_sentences=20000"])
  first = loop.tokenizer_for(cfg, tmp_path, docs)  # trained into the work directory
  assert loop.tokenizer_for(cfg, tmp_path, docs).sha256 == first.sha256
  cfg.tokenizer.vocab_size = 500
  with pytest.raises(ConfigError, match=f"^{tmp_path / 'tokenizer.model'} was trained as a bpe tokenizer of 400 pieces, not with "
                                        "tokenizer.model_type=bpe tokenizer.vocab_size=500; delete it to train another, or use a new --workdir$"):
    loop.tokenizer_for(cfg, tmp_path, docs)
  cfg.tokenizer.path = str(tokenizer.path)  # then given one: the run's copy is of that one
  assert loop.tokenizer_for(cfg, tmp_path, docs).path == tokenizer.path
  assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()


def test_a_resumed_runs_progress_bar_counts_from_its_start(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "stderr", Terminal())
  writer = metrics.MetricsWriter(tmp_path, 2000)
  writer.begin(1000)
  time.sleep(0.5)
  writer.write(1010, {"loss": 1.0, "learning_rate": 1e-3})
  writer.close()
  bar = sys.stderr.getvalue().split("\r")[-1]
  assert bar.startswith(" 50%|#####     | 1010/2000"), bar
  assert 0 < float(re.search(r"([\d.]+)step/s", bar).group(1)) <= 20.5  # 10 steps in half a second or more, not 1010


@pytest.mark.slow
def test_short_run_on_builtin_corpus_learns_and_writes_its_outputs(tmp_path):
  out = run_trainer(tmp_path / "run", "--sample-prompt=def ")
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  val_rows = [r for r in rows if "val_loss" in r]
  assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
  assert [r["step"] for r in val_rows] == [30, 60]
  assert set(train_rows[0]) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"}
  assert set(val_rows[0]) == {"step", "val_loss", "val_perplexity"}
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.75
  assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
  assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in train_rows)
  run = tmp_path / "run"
  assert (run / "tokenizer.model").exists() and (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert "vocab_size: 512" in (run / "config.yaml").read_text()  # resolved from the trained tokenizer
  assert "step 60 | loss" in out.stdout
  peak = float(re.search(r"mfu is against this machine's float32 matmul rate, measured now: ([\d.]+) GFLOP/s", out.stdout)[1])
  cfg = config.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
  per_token = flops.flops_per_token(cfg.model, cfg.train.seq_len)
  assert train_rows[-1]["mfu"] == pytest.approx(train_rows[-1]["tokens_per_sec"] * per_token / (peak * 1e9), rel=0.01)
  assert "\nsample (" in out.stdout and "\ndef " in out.stdout


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_naming_the_step(tmp_path):
  out = run_trainer(tmp_path / "run", "train.learning_rate=1e30", "train.warmup_steps=0", "log.every=1", "eval.every=1",
                    "checkpoint.every=1", "checkpoint.keep=100")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  match = re.fullmatch(r"error: (?:loss|gradient norm) became (nan|inf|-inf) at step (\d+); training stopped, nothing more was saved", last)
  assert match, last
  bad = int(match.group(2))
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert bad >= 2 and {r["step"] for r in logged} == set(range(1, bad))  # every step before it, finite
  assert all(math.isfinite(r.get("loss", 0.0)) for r in logged)
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == list(range(1, bad))  # a bad step never produces a checkpoint


def test_infinite_gradients_with_a_finite_loss_stop_before_a_save(tmp_path, tokenizer, monkeypatch):
  """Step 3's gradients overflow while its loss (of the parameters before it) is finite: the update
  leaves NaN parameters, which step 3's checkpoint must not hold."""
  from lm import train

  class OverflowingSteps(train.Steps):
    def __init__(self, *args):
      super().__init__(*args)
      step, self.calls = self.train_step, 0

      def overflowing(state, batch):
        state, out = step(state, batch)
        self.calls += 1
        if self.calls == 3:
          state = dataclasses.replace(state, params=jax.tree.map(lambda p: p * np.nan, state.params))
          out = out | {"grad_norm": out["grad_norm"] * np.inf}
        return state, out

      self.train_step = overflowing

  monkeypatch.setattr(loop, "Steps", OverflowingSteps)
  cfg = config.load("configs/tiny.yaml", tiny_overrides(**{
      "tokenizer.path": tokenizer.path, "train.steps": 5, "train.warmup_steps": 1, "checkpoint.every": 1,
      "checkpoint.keep": 10}))
  with pytest.raises(loop.TrainingError, match=r"^gradient norm became inf at step 3; training stopped, nothing more was saved$"):
    loop.run(cfg, tmp_path / "run")
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]


def test_resuming_with_less_retention_is_refused_before_a_kept_checkpoint_is_deleted(tmp_path, tokenizer):
  """Orbax applies the resumed run's retention to every checkpoint at its first save."""
  run = lambda steps, keep_every: loop.run(config.load("configs/tiny.yaml", tiny_overrides(**{
      "tokenizer.path": tokenizer.path, "train.steps": steps, "train.warmup_steps": 1, "checkpoint.every": 1,
      "checkpoint.keep": 1, "checkpoint.keep_every": keep_every})), tmp_path / "run")
  saved = lambda: sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  run(4, 2)
  assert saved() == [2, 4]
  with pytest.raises(ConfigError, match=r"checkpoint.keep_every 2 -> 0 would delete steps \[2, 4\], kept for ever until now; "
                                        r"resume with checkpoint.keep_every=2 \(or a divisor of it\)"):
    run(6, 0)
  assert saved() == [2, 4]
  run(6, 1)  # a divisor keeps them all
  assert saved() == [2, 4, 5, 6]


def test_resuming_over_data_that_gained_a_document_is_refused(tmp_path, tokenizer):
  """A file more under data.source moves the held-out split and the saved data position."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, path in enumerate(data.stdlib_files()[:40]):
    (corpus / f"{i}.py").write_text(Path(path).read_text(encoding="utf-8", errors="replace"))
  run = lambda steps: loop.run(config.load("configs/tiny.yaml", tiny_overrides(**{
      "tokenizer.path": tokenizer.path, "data.source": str(corpus), "data.val_fraction": 0.05, "train.steps": steps,
      "train.warmup_steps": 1, "checkpoint.every": 1, "eval.steps": 1})), tmp_path / "run")
  run(2)
  (corpus / "40.py").write_text("print('one more')\n")
  with pytest.raises(ConfigError, match=r"from step 2: its data sources hold other documents now \(per source, documents or a "
                                        r"single text's characters: train \[38\] then, \[39\] now\)"):
    run(3)
  (corpus / "40.py").unlink()
  assert int(run(3).step) == 3


def test_profile_steps_outside_the_run_say_nothing_is_traced(tmp_path, tokenizer, capsys):
  run = lambda steps, name="run": loop.run(config.load("configs/tiny.yaml", tiny_overrides(**{
      "tokenizer.path": tokenizer.path, "train.steps": steps, "train.warmup_steps": 1, "profile.steps": 1,
      "profile.start_step": 2})), tmp_path / name)
  run(1, "short")
  assert "profile.start_step=2 is after train.steps=1: nothing is traced (set an earlier step)" in capsys.readouterr().out
  run(2)
  assert (tmp_path / "run" / "profile" / "process_0").is_dir()
  capsys.readouterr()
  run(3)
  assert "profile.start_step=2 is not after step 2, where this run resumes: nothing is traced (set a later step)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_second_notice_while_the_last_save_is_written_does_not_lose_it(tmp_path):
  """A preemption's second SIGTERM (or a second Ctrl-C) arriving as the last checkpoint is written:
  the run still ends with that checkpoint, exit 0. The notice is sent from within the wait for the save."""
  notice = ("import os, signal, sys; from lm import loop; close = loop.Saves.close; "
            "loop.Saves.close = lambda self: (os.kill(os.getpid(), signal.SIGTERM), close(self))[1]; "
            "from launch.train import main; sys.exit(main())")
  command = trainer_command(tmp_path / "run", "train.steps=3")
  out = subprocess.run([sys.executable, "-c", notice, *command[3:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.returncode, out.stderr)
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_saves_and_stops_with_data_workers_in_one_line(tmp_path, tokenizer):
  """A terminal's Ctrl-C reaches the whole process group: grain's workers leave it to the trainer (each
  printed its KeyboardInterrupt's traceback)."""
  terminal = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from launch.train import main; sys.exit(main())")
  command = trainer_command(tmp_path / "run", "train.steps=2000", "log.every=1", "data.workers=1", f"tokenizer.path={tokenizer.path}")
  job = subprocess.Popen([sys.executable, "-c", terminal, *command[3:]], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.monotonic() + 300
  while not ((tmp_path / "run" / "metrics.jsonl").exists() and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2):
    assert time.monotonic() < deadline and job.poll() is None
    time.sleep(0.05)
  os.killpg(job.pid, signal.SIGINT)
  stdout, stderr = job.communicate(timeout=300)
  assert job.returncode == 0 and "stopped by SIGINT at step" in stdout, stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def test_bad_override_fails_before_any_work(tmp_path):
  out = run_trainer(tmp_path / "run", "model.d_modle=3")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: unknown config key 'model.d_modle'; did you mean model.d_model, model.d_ff, model.head_dim?"
  assert not (tmp_path / "run").exists()


def test_a_batch_fetched_ahead_keeps_the_position_before_it_and_its_read_error_for_later():
  """A step that saves fetches the next batch first: the checkpoint takes the position before it, and
  a failed read surfaces at the next step, after the save."""
  class Batches:
    position = 0

    def __next__(self):
      if self.position == 1:
        raise OSError("storage went away")
      self.position += 1
      return {"inputs": np.ones((1, 4), np.int32)}

    def get_state(self):
      return {"position": self.position}

  feed = loop.Feed(Batches(), rows=1, seq_len=4)
  next(feed)
  feed.peek()
  assert feed.get_state() == {"position": 1}
  with pytest.raises(OSError, match="storage went away"):
    next(feed)


class FakeTime:
  """A clock that moves only when the test says: the loop's only source of time here."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self) -> float:
    return self.now


def test_tokens_per_sec_counts_training_steps_only_and_zero_cadence_means_the_last_step(tmp_path, tokenizer, monkeypatch,
                                                                                        capsys):
  """Fetching a batch takes 2 s, the first step (its compilation) 50 s, the others no time (a run that
  its data bounds), each evaluation 100 s. Every row but the last (which has no next batch to fetch)
  counts 2 s a step: the rows of an evaluated step and of the step after it too; checkpoint.every=0
  saves at the last step only."""
  from lm import config, loop, metrics, train

  clock = FakeTime()

  class TimedSteps(train.Steps):
    def __init__(self, *args):
      super().__init__(*args)
      step, self.calls = self.train_step, 0

      def timed(state, batch):
        out = jax.block_until_ready(step(state, batch))
        clock.now += 0.0 if self.calls else 50.0
        self.calls += 1
        return out

      self.train_step = timed

  def slow_evaluate(*args):
    clock.now += 100.0
    return evaluate(*args)

  def slow_fetch(feed):
    clock.now += 2.0
    return fetch(feed)

  evaluate, fetch = loop.evaluate, loop.Feed._fetch
  monkeypatch.setattr(loop.Feed, "_fetch", slow_fetch)
  monkeypatch.setattr(loop, "Steps", TimedSteps)
  monkeypatch.setattr(loop, "evaluate", slow_evaluate)
  monkeypatch.setattr(loop, "time", clock)
  monkeypatch.setattr(metrics, "time", clock, raising=False)
  cfg = config.load("configs/tiny.yaml", tiny_overrides(**{
      "tokenizer.path": tokenizer.path, "train.steps": 6, "train.warmup_steps": 2, "train.learning_rate": 0.01,
      "log.every": 1, "eval.every": 3, "eval.steps": 1, "checkpoint.every": 0}))
  loop.run(cfg, tmp_path / "run")
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  assert [(r["step"], "loss" in r) for r in rows] == [(1, True), (2, True), (3, True), (3, False), (4, True), (5, True),
                                                      (6, True), (6, False)]
  assert "tokens_per_sec" not in train_rows[0]  # step 1 is left out
  assert [8 * 32 / r["tokens_per_sec"] for r in train_rows[1:5]] == pytest.approx([2.0] * 4)
  assert "step 1 took 52.0s with its compilation (left out of tokens/s)" in capsys.readouterr().out
  for r in train_rows:  # the rate of the step's own update, step - 1: warmup over 2, then cosine to 0.1 x peak
    t = r["step"] - 1
    want = 0.01 * t / 2 if t < 2 else 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 4))
    assert r["learning_rate"] == pytest.approx(want, rel=1e-5)
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["6"]
