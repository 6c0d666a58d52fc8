"""The real trainer, run as a user runs it: python -m launch.train."""

import json
import math
import re

import pytest

from tests.conftest import run_trainer

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
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
  assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
  assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in train_rows)
  run = tmp_path / "run"
  assert (run / "tokenizer.model").exists() and (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert "vocab_size: 512" in (run / "config.yaml").read_text()  # resolved from the trained tokenizer
  assert "step 60 | loss" in out.stdout
  assert "\nsample (" in out.stdout and "\ndef " in out.stdout


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_naming_the_step(tmp_path):
  out = run_trainer(tmp_path / "run", "train.learning_rate=1e30", "train.warmup_steps=0", "log.every=1", "eval.every=1",
                    "checkpoint.every=1", "checkpoint.keep=100")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  match = re.fullmatch(r"error: loss became (nan|inf|-inf) at step (\d+); training stopped, nothing more was saved", last)
  assert match, last
  bad = int(match.group(2))
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert bad >= 2 and {r["step"] for r in logged} == set(range(1, bad))  # every step before it, finite
  assert all(math.isfinite(r.get("loss", 0.0)) for r in logged)
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == list(range(1, bad))  # a bad step never produces a checkpoint


def test_bad_override_fails_before_any_work(tmp_path):
  out = run_trainer(tmp_path / "run", "model.d_modle=3")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: unknown config key 'model.d_modle'; did you mean model.d_model, model.d_ff, model.head_dim?"
  assert not (tmp_path / "run").exists()
