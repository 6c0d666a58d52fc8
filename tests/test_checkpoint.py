"""Checkpoints with the real trainer as a subprocess: exact resume, other meshes, signals, kills,
corruption, incompatible configs, fine-tuning starts and full disks."""

import asyncio
import gc
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from lm.checkpoint import Checkpoints, quiet_orphaned_reads
from lm.config import ConfigError
from lm.sampler import Sampler
from tests.conftest import ROOT, run_trainer, trainer_command

pytestmark = pytest.mark.slow
STEPS = ["train.steps=12", "log.every=1", "eval.every=6", "checkpoint.every=6"]


def losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tensorboard_scalars(workdir: Path, tag: str) -> list[tuple[int, float]]:
  """What TensorBoard shows of a tag: the event files in order, where a restart (a SessionLog START at
  step s) hides what was logged before it from step s on."""
  shown = []
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):  # TFRecords: length, its CRC, the event, its CRC
      length = struct.unpack("<Q", data[at:at + 8])[0]
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 16 + length
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = [(step, v) for step, v in shown if step < event.step]
      shown += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return shown


def final_params(workdir: Path, step: int) -> dict:
  """Parameters of a checkpoint, restored whole onto one device of this process."""
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      ckpts.manager.item_metadata(step)["params"])
  params = jax.tree.map(np.asarray, ckpts.restore_params(step, abstract))
  ckpts.close()
  return params


def start(workdir: Path, *overrides: str) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  return subprocess.Popen(trainer_command(workdir, *overrides), cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout: float = 300.0, every: float = 0.05) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(every)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
  """An uninterrupted 12-step run with checkpoints at steps 6 and 12."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  out = run_trainer(workdir, *STEPS)
  assert out.returncode == 0, out.stderr
  return workdir


def test_resume_on_another_device_count_and_mesh_shape(straight, tmp_path):
  workdir = tmp_path / "run"
  out = run_trainer(workdir, *STEPS, "mesh.data=1", "mesh.fsdp=8")
  assert out.returncode == 0, out.stderr
  shutil.rmtree(workdir / "checkpoints" / "12")
  garbled = '{"step": 12, "lo\\x00\\x00'  # a whole line that is no row (a disk fault): moved aside with the rows after step 6
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write(garbled + "\n")
  out = run_trainer(workdir, *STEPS, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2", devices=4)
  assert out.returncode == 0, out.stderr
  assert "resumed from step 6" in out.stdout
  assert "mesh.data: 1 -> 2; mesh.fsdp: 8 -> 1; mesh.tensor: 1 -> 2" in out.stdout
  assert "{'data': 2, 'fsdp': 1, 'tensor': 2}" in out.stdout
  resumed, reference = losses(workdir), losses(straight)
  np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [reference[s] for s in range(1, 13)], atol=1e-5)
  *rolled_back, last = (workdir / "metrics.rolled-back.jsonl").read_text().splitlines()
  assert min(json.loads(r)["step"] for r in rolled_back) == 7 and last == garbled  # kept aside, not lost
  shown = tensorboard_scalars(workdir, "loss")  # each step once, the resumed run's from step 7 on
  assert [step for step, _ in shown] == list(range(1, 13))
  np.testing.assert_allclose([v for _, v in shown], [resumed[s] for s in range(1, 13)], rtol=1e-6)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  proc = start(workdir, "train.steps=200", "checkpoint.every=2", "checkpoint.keep=100", "log.every=1")
  ckpt_dir = workdir / "checkpoints"
  in_progress = lambda: ckpt_dir.is_dir() and any("tmp" in p.name for p in ckpt_dir.iterdir())
  wait_for(lambda: proc.poll() is not None or (in_progress() and len(list(ckpt_dir.iterdir())) > 3), every=0.001)
  proc.kill()
  proc.communicate()
  left = sorted(p.name for p in ckpt_dir.iterdir())
  assert any("tmp" in name for name in left), left  # killed with a save half-written
  complete = Checkpoints(ckpt_dir, read_only=True).steps()
  assert complete and all(str(s) in left for s in complete)

  out = run_trainer(workdir, "train.steps=200", "checkpoint.every=2", "checkpoint.keep=100", "log.every=1", "train.steps=" + str(complete[-1] + 2))
  assert out.returncode == 0, out.stderr
  assert f"resumed from step {complete[-1]}" in out.stdout
  after = Checkpoints(ckpt_dir, read_only=True).steps()
  assert set(complete) <= set(after) and after[-1] == complete[-1] + 2


def test_corrupted_checkpoint_falls_back_to_the_previous_one_and_is_kept(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  for data_file in (workdir / "checkpoints" / "12" / "params").rglob("ocdbt.process_0/d/*"):  # every array's, so
    os.truncate(data_file, data_file.stat().st_size // 3)  # reads still run when the first one fails
  with pytest.raises(ConfigError, match=r"^checkpoint at step 12 is unreadable \(.*checkpoints/12/params/"):
    Sampler.from_workdir(workdir)  # lm-sample's (and --init-from's) one line
  out = run_trainer(workdir, *STEPS[1:], "train.steps=14", devices=1)  # whole arrays, each one read
  assert out.returncode == 0, out.stderr
  assert "Traceback" not in out.stderr  # not the array reads orbax leaves running when one fails
  lines = out.stdout.splitlines()
  bad = next(line for line in lines if line.startswith("checkpoint at step 12 is unreadable"))
  assert "checkpoints/12/params/" in bad and "trying the previous checkpoint" in bad
  assert "resumed from step 6" in lines
  kept = list((workdir / "checkpoints_unreadable").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("12-") and (kept[0] / "params").is_dir()
  assert Checkpoints(workdir / "checkpoints", read_only=True).steps() == [6, 12, 14]
  for data_file in (workdir / "checkpoints").rglob("ocdbt.process_0/d/*"):  # all of them: no fresh start unasked
    os.truncate(data_file, data_file.stat().st_size // 3)
  out = run_trainer(workdir, *STEPS[1:], "train.steps=14", devices=1)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (f"error: every checkpoint in {workdir} was unreadable and is set aside in "
                                                 "checkpoints_unreadable/; rerun the same command to start afresh, from step 0")


def test_a_checkpoint_this_machine_cannot_take_in_is_left_in_place(straight, tmp_path, monkeypatch):
  """Out of device memory while the parameters are placed (as on too few chips): one line, every
  checkpoint where it was, the metrics untouched; not 'unreadable', which would set them all aside
  and start again from step 0."""
  import orbax.checkpoint as ocp

  from lm import config, loop
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  metrics_before = (workdir / "metrics.jsonl").read_text()
  restore = ocp.CheckpointManager.restore

  def out_of_memory(self, step, args=None, **kwargs):
    if "params" in args:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    return restore(self, step, args=args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
  line = (r"^checkpoint at step 12 could not be restored here \(RESOURCE_EXHAUSTED: Out of memory while trying to "
          r"allocate 1.2GiB\); it was left in place: rerun where there is the memory and access it needs$")
  with pytest.raises(ConfigError, match=line):
    loop.run(config.load(str(workdir / "config.yaml"), ["train.steps=14"]), workdir)
  with pytest.raises(ConfigError, match=line):
    Sampler.from_workdir(workdir)
  assert Checkpoints(workdir / "checkpoints", read_only=True).steps() == [6, 12]
  assert not (workdir / "checkpoints_unreadable").exists()
  assert (workdir / "metrics.jsonl").read_text() == metrics_before


def test_incompatible_config_fails_before_loading_and_safe_changes_are_reported(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  settings = (workdir / "config.yaml").read_text()
  out = run_trainer(workdir, *STEPS, "model.d_ff=256", "model.num_layers=3")
  assert out.returncode == 1
  assert out.stderr.strip() == (f"error: cannot resume {workdir} from step 12: model.d_ff: 128 -> 256; "
                                f"model.num_layers: 2 -> 3 differ from its checkpoint; use a new --workdir (or --init-from {workdir})")
  assert (workdir / "config.yaml").read_text() == settings  # the run's record is not the refused settings
  out = run_trainer(workdir, *STEPS[1:], "train.steps=6")
  assert out.returncode == 0 and "nothing to train: the run is at step 12 and train.steps=6" in out.stdout
  out = run_trainer(workdir, *STEPS[1:], "train.steps=13", "train.learning_rate=0.001")
  assert out.returncode == 0, out.stderr
  assert "resuming with changed settings: train.learning_rate: 0.003 -> 0.001; train.steps: 12 -> 13" in out.stdout


def test_init_from_takes_parameters_only(straight, tmp_path, shared_data):
  workdir = tmp_path / "finetune"
  workdir.mkdir()  # where an attempt without --init-from trained a tokenizer of its own, then stopped
  shutil.copyfile(shared_data / "c4_en_32k_sentencepiece.model", workdir / "tokenizer.model")
  long_prompt = "--sample-prompt=" + "x = 1\n" * 40  # past what the tiny model's sample can hold
  out = run_trainer(workdir, "train.steps=1", "train.learning_rate=0.01", long_prompt, init_from=f"{straight}:6")
  assert out.returncode == 0, out.stderr  # trained and saved: only the sample is skipped, in one line
  assert re.search(r"^no sample: prompt 0 has \d+ tokens; with max_new_tokens=32 that exceeds the model's max_seq_len=64$",
                   out.stderr, re.M)
  assert f"initialized parameters from {straight}:6 (step 6); fresh optimizer at step 0" in out.stdout
  assert (workdir / "tokenizer.model").read_bytes() == (straight / "tokenizer.model").read_bytes()
  # The first step of a warmup schedule has learning rate 0: the parameters are exactly step 6's.
  got, want = final_params(workdir, 1), final_params(straight, 6)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want)))
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  assert ckpts.meta(1)["config"]["train"]["learning_rate"] == 0.01
  out = run_trainer(workdir, "train.steps=2", init_from=str(straight))
  assert out.returncode == 0, out.stderr
  assert f"--init-from {straight} is not used: {workdir} has checkpoints of its own, so it resumes from them" in out.stdout
  for step in (1, 2):  # its own all unreadable: neither random weights nor a silent switch to --init-from
    for data_file in (workdir / "checkpoints" / str(step) / "params").rglob("ocdbt.process_0/d/*"):
      os.truncate(data_file, data_file.stat().st_size // 3)
  out = run_trainer(workdir, "train.steps=2", init_from=str(straight))
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (f"error: every checkpoint in {workdir} was unreadable and is set aside in "
                                                 f"checkpoints_unreadable/; rerun the same command to start from --init-from {straight}")
  out = run_trainer(workdir, "train.steps=2", init_from=str(straight))
  assert out.returncode == 0 and f"initialized parameters from {straight} (step 12)" in out.stdout
  out = run_trainer(tmp_path / "other", "model.d_model=96", init_from=str(straight))
  assert out.returncode == 1 and "model.d_model: 64 -> 96" in out.stderr
  out = run_trainer(tmp_path / "other", init_from=f"{straight}:5")
  assert out.returncode == 1 and "no checkpoint at step 5; available: [6, 12]" in out.stderr


def test_a_failed_restores_orphaned_reads_are_quiet_and_other_lost_errors_are_not(caplog):
  """The reads a failed restore leaves behind end later, their errors never retrieved: orbax's wrapped
  ones and tensorstore's own (once a stray last line after the run's error) are dropped; others log."""
  quiet_orphaned_reads()
  loop = asyncio.new_event_loop()
  for message in ('OUT_OF_RANGE: Error reading "blocks.w_up/0.5.0" in OCDBT database at local file "x/"', "another error"):
    future = loop.create_future()
    future.set_exception(ValueError(message))
    del future
    gc.collect()
  loop.close()
  assert [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"] == ["another error"]


def test_full_disk_fails_the_save_clearly_and_keeps_earlier_checkpoints(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)

  def small_files():  # a file may grow to 64 KiB: metrics and logs fit, checkpoint data does not
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

  out = run_trainer(workdir, *STEPS[1:], "train.steps=14", "checkpoint.every=2", preexec_fn=small_files)
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]  # orbax also logs
  assert len(errors) == 1 and errors[0].startswith("error: checkpoint save at step 14 failed")
  assert "File too large" in errors[0]
  assert Checkpoints(workdir / "checkpoints", read_only=True).steps() == [6, 12]
  assert run_trainer(workdir, *STEPS[1:], "train.steps=14").returncode == 0


def test_a_full_disk_under_the_metrics_is_one_line(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  rows = (workdir / "metrics.jsonl").read_text()
  limit = len(rows) + 20  # room for no further metrics row
  (workdir / "metrics.jsonl").write_text(rows)

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  out = run_trainer(workdir, *STEPS[1:], "train.steps=14", preexec_fn=small_files)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (f"error: writing the metrics of step 13 to {workdir} failed (File too large); "
                                                "free the space (or restore access) and rerun the same command to go on from the newest checkpoint")


def test_a_checkpoint_manager_closed_at_once_leaves_no_thread_behind(tmp_path):
  """As after a config error: orbax cleans temporary directories in a thread that close must wait for."""
  code = f"from lm.checkpoint import Checkpoints; Checkpoints({str(tmp_path / 'c')!r}).close()"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def test_unwritable_workdir_fails_at_start(tmp_path):
  (tmp_path / "file").write_text("")
  out = run_trainer(tmp_path / "file" / "run")
  assert out.returncode == 1
  assert out.stderr.strip() == f"error: work directory '{tmp_path / 'file' / 'run'}' is not writable: Not a directory"
  (tmp_path / "run" / "config.yaml").mkdir(parents=True)  # a file the run writes as it starts, that cannot be
  out = run_trainer(tmp_path / "run", "train.steps=1")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (f"error: writing to {tmp_path / 'run'} failed (Is a directory); "
                                                 "free the space (or restore access) and rerun")


def test_keeps_the_newest_k_and_every_m_th_checkpoint_and_zero_cadences_mean_the_last_step(tmp_path):
  (tmp_path / "run" / "loss.png").mkdir(parents=True)  # the plot, written last, cannot be: the run is still done
  out = run_trainer(tmp_path / "run", "train.steps=9", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.keep_every=4",
                    "log.every=0", "eval.every=0")
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
  assert (f"the loss plot {tmp_path / 'run' / 'loss.png'} could not be written (Is a directory); metrics.jsonl holds its numbers"
          in out.stdout)
  assert Checkpoints(tmp_path / "run" / "checkpoints", read_only=True).steps() == [4, 8, 9]
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], "loss" in r, "val_loss" in r) for r in rows] == [(9, True, False), (9, False, True)]


def test_sigterm_saves_and_a_resumed_run_on_a_token_cache_matches_the_straight_raw_run_bitwise(straight, tmp_path):
  cache = tmp_path / "cache"
  prepare = subprocess.run([sys.executable, "-m", "launch.prepare", "--quiet", "--out", str(cache), "--workers", "2",
                            f"tokenizer.path={straight / 'tokenizer.model'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert prepare.returncode == 0, prepare.stderr
  workdir, on_cache = tmp_path / "run", [*STEPS, f"data.source=tokens:{cache}"]  # the tokenizer comes from the cache
  proc = start(workdir, *on_cache)
  wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 3)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert 3 <= stopped < 12 and stopped in Checkpoints(workdir / "checkpoints", read_only=True).steps()

  out = run_trainer(workdir, *on_cache)
  assert out.returncode == 0, out.stderr
  assert f"resumed from step {stopped}" in out.stdout
  assert losses(workdir) == losses(straight)  # the same documents in the same order, every step bitwise
  want, got = final_params(straight, 12), final_params(workdir, 12)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, want, got)))
