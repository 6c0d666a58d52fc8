"""Several simulated hosts on this machine, through launch.local_cluster."""

import contextlib
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch.local_cluster import child_env, free_port
from lm import jobs
from lm.tokenizer import file_digest
from tests.conftest import ROOT, finish, run_trainer, tiny_overrides

pytestmark = pytest.mark.slow
SETTINGS = tiny_overrides(**{"train.seq_len": 64, "train.steps": 8, "train.warmup_steps": 2, "log.every": 1,
                             "eval.every": 4, "eval.steps": 2, "checkpoint.every": 4})


def cluster(workdir: Path, *overrides: str, processes: int = 2, devices: int = 4) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "launch.local_cluster", "--processes", str(processes), "--devices-per-process",
         str(devices), "--", "train", "--workdir", str(workdir), "--sample-prompt=", *SETTINGS, *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def losses(workdir: Path) -> list[float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("single") / "run"
  out = run_trainer(workdir, *SETTINGS, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  assert out.returncode == 0, out.stderr
  return workdir


def test_two_processes_log_the_losses_of_one_process(single, tmp_path):
  proc = cluster(tmp_path / "run", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "profile.start_step=3", "profile.steps=2")
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr
  assert len(losses(single)) == 8
  np.testing.assert_allclose(losses(tmp_path / "run"), losses(single), atol=1e-5)
  assert "[p0] step 8 | loss" in stdout and "[p1] step" not in stdout  # only process 0 logs
  positions = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "8" / "data").glob("process_*"))
  assert positions == ["process_0-of-2.json", "process_1-of-2.json"]  # each process saves its data position
  # only process 0 traces: an XProf trace of the train step, as TensorBoard's profile plugin reads it
  assert sorted(p.name for p in (tmp_path / "run" / "profile").iterdir()) == ["process_0"]
  traces = list((tmp_path / "run" / "profile" / "process_0" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and b"train_step" in traces[0].read_bytes()


def test_two_processes_sample_what_one_process_samples(single, tmp_path):
  """lm-sample over two processes (slots split between them, tensor-parallel within each) writes one
  file with the completions one process makes; more prompts than slots, so inserts cross processes."""
  from lm.sampler import Sampler

  prompts = [f"def f{i}(x):" + " x" * i for i in range(5)]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "launch.local_cluster", "--processes", "2", "--devices-per-process", "2", "--", "sample",
         "--workdir", str(single), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "8", "--batch-size", "2",
         "--temperature", "0.8", "--seed", "3", "--output", str(out)]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "[p0] mesh: {'data': 2, 'fsdp': 1, 'tensor': 2}" in done.stderr and "[p1] mesh" not in done.stderr
  header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
  want = Sampler.from_workdir(single).generate(prompts, max_new_tokens=8, temperature=0.8, seed=3)
  assert sorted((r["index"], r["token_ids"]) for r in rows) == [(i, c.token_ids) for i, c in enumerate(want)]
  # The same job resumed where process 0's disk fills up after one more line: every process stops with its line
  full = tmp_path / "full.jsonl"
  full.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))
  limit = full.stat().st_size + 50

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.sample", *cmd[cmd.index("--workdir"):-1], str(full)], cwd=ROOT,
                            env=child_env(p, 2, 2, port), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=small_files if p == 0 else None) for p in (0, 1)]
  errors = finish(procs, 120)
  assert [proc.returncode for proc in procs] == [1, 1], errors
  line = (f"writing the completions to {full} failed (File too large); {full} holds the completions made so far, and the "
          "same command makes the rest")
  assert [e.splitlines()[-1] for e in errors] == [f"error: {line}", f"error: process 0: {line}"]
  # Hosts whose listings differ (a step committed between them): process 0's newest is every process's
  for p in (0, 1):
    shutil.copytree(single, tmp_path / f"host{p}" / "run")
  shutil.rmtree(tmp_path / "host0" / "run" / "checkpoints" / "8")
  port = free_port()
  cmd = [sys.executable, "-m", "launch.sample", "--workdir", "run", "--prompts", str(tmp_path / "p.jsonl"),
         "--max-new-tokens", "8", "--batch-size", "2", "--temperature", "0.8", "--seed", "3", "--output", str(tmp_path / "lag.jsonl")]
  procs = [subprocess.Popen(cmd, cwd=tmp_path / f"host{p}", env=child_env(p, 2, 2, port) | {"PYTHONPATH": str(ROOT)},
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in (0, 1)]
  errors = finish(procs, 300)
  assert [proc.returncode for proc in procs] == [0, 0], errors
  header, *rows = [json.loads(line) for line in (tmp_path / "lag.jsonl").read_text().splitlines()]
  want = Sampler.from_workdir(single, step=4).generate(prompts, max_new_tokens=8, temperature=0.8, seed=3)
  assert header["settings"]["step"] == 4
  assert sorted((r["index"], r["token_ids"]) for r in rows) == [(i, c.token_ids) for i, c in enumerate(want)]
  # Prompts files of their own (a relative path on each host's disk) that differ: one line, on every process
  for p in (0, 1):
    (tmp_path / f"host{p}" / "p.jsonl").write_text(json.dumps({"prompt": f"host {p}"}) + "\n")
  port = free_port()
  cmd[cmd.index("--prompts") + 1], cmd[cmd.index("--output") + 1] = "p.jsonl", str(tmp_path / "differ.jsonl")
  procs = [subprocess.Popen(cmd, cwd=tmp_path / f"host{p}", env=child_env(p, 2, 2, port) | {"PYTHONPATH": str(ROOT)},
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in (0, 1)]
  errors = finish(procs, 300)
  assert [proc.returncode for proc in procs] == [1, 1], errors
  digests = [jobs.prompts_digest([f"host {p}"]) for p in (0, 1)]
  assert errors[1].splitlines()[-1] == f"error: process 1 runs other settings than process 0: prompts: '{digests[0]}' on process 0, '{digests[1]}' here"


OPEN_OUTPUT = """
import json, sys
import jax
from lm import distributed, jobs
from lm.config import ConfigError
distributed.initialize()
path = sys.argv[1] + f"/out{jax.process_index()}.jsonl"  # a file of each host's own
try:
  out, done = jobs.open_output(path, {"seed": int(sys.argv[2])}, write=jax.process_index() == 0)
  print(json.dumps(sorted(done)))
except ConfigError as e:
  print(e)
"""


def test_every_process_resumes_a_job_from_what_process_0_sees_in_its_output(tmp_path):
  """On a slice whose hosts each see a file of their own (a relative --output on a TPU VM's disk),
  process 0's file decides: both skip its finished pairs, and its other settings stop both."""
  (tmp_path / "out0.jsonl").write_text('{"settings": {"seed": 1}}\n{"index": 3}\n{"index": 0, "sample": 1}\n')
  for seed, want in ((1, "[[0, 1], [3, 0]]"), (2, f"--output '{tmp_path / 'out0.jsonl'}' was written with other settings "
                                                  "(seed: 1 then, 2 now); rerun with those or choose a new path")):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_OUTPUT, str(tmp_path), str(seed)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(p, 2, 1, port)) for p in (0, 1)]
    assert [proc.communicate(timeout=120)[0].strip().splitlines()[-1] for proc in procs] == [want, want]
  assert not (tmp_path / "out1.jsonl").exists()


def test_two_processes_stop_on_sigterm_and_resume(single, tmp_path):
  workdir = tmp_path / "run"
  proc = cluster(workdir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  deadline = time.monotonic() + 300
  while not ((workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 2):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert stopped < 8
  # only process 1 cannot read its part of the newest checkpoint: both go back to the one before (or, asked
  # to, start afresh), together; losses equal to the single process's show they restored the same step
  (workdir / "checkpoints" / str(stopped) / "data" / "process_1-of-2.json").write_text("{not json")
  proc = cluster(workdir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  stdout, stderr = proc.communicate(timeout=600)
  assert f"[p0] checkpoint at step {stopped} is unreadable on process(es) [1]; moved it to" in stdout
  if stopped <= 4:  # it was the only one
    assert proc.returncode == 1 and "was unreadable and is set aside in checkpoints_unreadable/; rerun" in stderr
    proc = cluster(workdir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr
  assert ("[p0] resumed from step 4" in stdout) == (stopped > 4) and f"resumed from step {stopped}" not in stdout
  np.testing.assert_allclose(losses(workdir), losses(single), atol=1e-5)
  # Rules that give each process every row: its saved position is of rows 0-3 or 4-7 only.
  proc = cluster(workdir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=10", "mesh.rules={batch: [fsdp]}")
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 1
  assert ("[p0] error: cannot resume " + str(workdir) + " from step 8: this mesh gives the processes other rows of each batch "
          "than its data positions are of (process 0: rows 0-3 then, 0-7 now; process 1: rows 4-7 then, 0-7 now); "
          "resume with the mesh settings it was saved with") in stderr, stderr
  # Hosts whose listings differ (step 8 committed between them): both resume from process 0's newest,
  # 4, where the run ends, and sample it together
  for p in (0, 1):
    shutil.copytree(workdir, tmp_path / f"host{p}" / "run")
  shutil.rmtree(tmp_path / "host0" / "run" / "checkpoints" / "8")
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--workdir", "run", *SETTINGS, "mesh.data=2",
                             "mesh.fsdp=2", "mesh.tensor=2", "train.steps=4"], cwd=tmp_path / f"host{p}",
                            env=child_env(p, 2, 4, port) | {"PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in (0, 1)]
  outputs = [proc.communicate(timeout=120)[0] for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], outputs
  assert "resumed from step 4" in outputs[0] and "\nsample (" in outputs[0]


def test_processes_with_different_settings_fail_naming_the_process(tmp_path, tokenizer, shared_data):
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--workdir", str(tmp_path / "run"), *SETTINGS,
                             f"train.steps={8 + p}"], cwd=ROOT, env=child_env(p, 2, 2, port), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in range(2)]
  errors = finish(procs, 300)
  assert [proc.returncode for proc in procs] == [1, 1]
  assert "error: process 1 runs other settings than process 0: train.steps: 8 on process 0, 9 here" in errors[1]
  assert "error: process(es) [1] run other settings than process 0" in errors[0]
  # the same data.source, but one more document where process 1 looks (a host whose copy lags)
  for p, files in ((0, 20), (1, 21)):
    (tmp_path / f"host{p}" / "corpus").mkdir(parents=True)
    for i in range(files):
      (tmp_path / f"host{p}" / "corpus" / f"{i}.txt").write_text(f"document {i}\n" * 50)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--workdir", str(tmp_path / "data-run"), *SETTINGS,
                             "data.source=~/corpus", "data.val_fraction=0.1", f"tokenizer.path={tokenizer.path}"], cwd=ROOT,
                            env=child_env(p, 2, 2, port) | {"HOME": str(tmp_path / f"host{p}")}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in range(2)]
  errors = finish(procs, 300)
  assert [proc.returncode for proc in procs] == [1, 1]
  assert "error: process 1 runs other settings than process 0: documents.train: [18] on process 0, [19] here" in errors[1]
  # a host that sees no such files at all (they waited for it at their next collective for ever)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--workdir", str(tmp_path / "data-run"), *SETTINGS,
                             "data.source=~/corpus", f"tokenizer.path={tokenizer.path}"], cwd=ROOT,
                            env=child_env(p, 2, 2, port) | {"HOME": str(tmp_path / ("host0" if p == 0 else "bare"))}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in range(2)]
  errors = finish(procs, 120)
  assert [proc.returncode for proc in procs] == [1, 1]
  assert [e.strip().splitlines()[-1] for e in errors] == ["error: process 1: data source '~/corpus' matched no files",
                                                          "error: data source '~/corpus' matched no files"]
  # the same tokenizer.path, another file behind it (a host-local copy left from another run)
  shutil.copyfile(tokenizer.path, tmp_path / "host0" / "tok.model")
  shutil.copyfile(shared_data / "c4_en_32k_sentencepiece.model", tmp_path / "host1" / "tok.model")
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--workdir", str(tmp_path / "tok-run"), *SETTINGS,
                             "tokenizer.path=~/tok.model"], cwd=ROOT, env=child_env(p, 2, 2, port) | {"HOME": str(tmp_path / f"host{p}")},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in range(2)]
  errors = finish(procs, 300)
  assert [proc.returncode for proc in procs] == [1, 1]
  assert (f"error: process 1 runs other settings than process 0: tokenizer_sha256: '{file_digest(tokenizer.path)}' on process 0, "
          f"'{file_digest(shared_data / 'c4_en_32k_sentencepiece.model')}' here") in errors[1]


def test_start_up_errors_are_one_line_on_every_process(tmp_path):
  env = {**child_env(1, 2, 2, free_port()), "LM_DISTRIBUTED_TIMEOUT": "5"}
  out = subprocess.run([sys.executable, "-m", "launch.train", "--workdir", str(tmp_path / "run"), *SETTINGS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert re.fullmatch(r"error: process 1: could not reach coordinator 127.0.0.1:\d+ within 5s", out.stderr.strip())
  out = subprocess.run([sys.executable, "-m", "launch.train", "--workdir", str(tmp_path / "run"), *SETTINGS],
                       cwd=ROOT, env={**env, "LM_DISTRIBUTED_TIMEOUT": "2m"}, capture_output=True, text=True, timeout=300)
  assert (out.returncode, out.stderr.strip()) == (1, "error: LM_DISTRIBUTED_TIMEOUT='2m' must be a whole number of seconds, at least 1")
  proc = cluster(tmp_path / "run", "mesh.data=3")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert "[p0] error: mesh data=3 fsdp=1 tensor=1 needs 3 devices, but 8 are available" in stderr
  # A tokenizer that process 0 alone trains, and cannot: every process stops with its reason (the
  # others waited for it at a barrier)
  (tmp_path / "few").mkdir()
  for i in range(3):
    (tmp_path / "few" / f"{i}.txt").write_text(f"a short document {i}\n")
  proc = cluster(tmp_path / "fresh", f"data.source={tmp_path / 'few'}", "tokenizer.vocab_size=4000")
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 1
  for p, who in ((0, ""), (1, "process 0: ")):
    assert re.search(rf"^\[p{p}\] error: {who}cannot train a bpe tokenizer with tokenizer.vocab_size=4000: ", stderr, re.M), stderr


def test_metrics_process_0_cannot_write_stop_every_process(tmp_path):
  """Only process 0 writes metrics: when that fails, the others stop with its line (they waited for it
  at their next collective)."""
  workdir = tmp_path / "run"
  proc = cluster(workdir, "train.steps=200")
  metrics_file = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (metrics_file.exists() and len(losses(workdir)) >= 2):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  while not metrics_file.is_dir():  # storage that refuses process 0's next row
    metrics_file.unlink(missing_ok=True)
    with contextlib.suppress(FileExistsError):  # process 0 wrote a row in between
      metrics_file.mkdir()
  stderr = finish([proc], 120)[0]
  assert proc.returncode == 1, stderr
  step = int(re.search(r"\[p0\] error: writing the metrics of step (\d+) ", stderr).group(1))
  assert step < 200
  line = (f"writing the metrics of step {step} to {workdir} failed (Is a directory); free the space (or restore access) "
          "and rerun the same command to go on from the newest checkpoint")
  assert f"[p0] error: {line}" in stderr and f"[p1] error: process 0: {line}" in stderr


def test_a_data_error_on_one_process_stops_every_process(tmp_path, tokenizer, shared_data):
  """A malformed record that one process reads mid-run ends every process with its line (the others
  waited for it in the step's collectives until killed), and nothing trained since is saved."""
  paragraphs = [p for p in (shared_data / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:2000]
  lines = [json.dumps({"text": p}) for p in paragraphs]
  lines[1000] = '{"text": "a line cut short"'
  (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
  workdir = tmp_path / "run"
  proc = cluster(workdir, f"data.source=jsonl:{tmp_path / 'docs.jsonl'}", f"tokenizer.path={tokenizer.path}",
                 "data.val_fraction=0", "data.shuffle_window=1", "eval.steps=0", "train.steps=400")
  stdout, stderr = proc.communicate(timeout=150)
  line = f"{tmp_path / 'docs.jsonl'}:1001: malformed JSON (Expecting ',' delimiter at column 1)"
  errors = re.findall(r"^\[p(\d)\] error: (.*)$", stderr, re.M)
  assert proc.returncode == 1 and len(errors) == 2, stderr
  failed = next(p for p, message in errors if message == line)  # the process that read it
  assert sorted(errors) == sorted([(failed, line), (str(1 - int(failed)), f"process {failed}: {line}")])
  logged = int(re.findall(r"^\[p0\] step (\d+) \|", stdout, re.M)[-1])
  assert 1 < logged < 400
  assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) <= logged


def test_a_sigterm_during_set_up_stops_every_process_at_their_first_agreed_step(tmp_path):
  """Across processes JAX's preemption service took a SIGTERM that came before training, and the run
  trained on until killed."""
  workdir = tmp_path / "run"
  proc = cluster(workdir, "train.steps=200")
  deadline = time.monotonic() + 300
  while not (workdir / "tokenizer.model").exists():  # trained and written during set-up
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  assert "[p0] stopped by SIGTERM at step 1; checkpoint saved" in stdout
  assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["1"]
