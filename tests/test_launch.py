"""Cluster launch scripts (dry runs) and the ahead-of-time TPU compile."""

import math
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm import config, sharding
from lm.sampler import sampling_config
from tests.conftest import ROOT


def launch(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=900)


def test_tpu_pod_dry_run_ships_an_archive_that_replaces_the_tree_and_runs_detached():
  out = launch("tpu_pod", "--tpu", "pod7", "--zone", "us-east5-a", "--project", "proj", "--run-name", "r1", "--dry-run",
               "--", "train", "--config", "configs/7b.yaml", "--workdir", "/mnt/runs/7b", "train.learning_rate=1e-4")
  assert out.returncode == 0, out.stderr
  files, scp, install, run, follow = out.stdout.strip().splitlines()
  archive = re.fullmatch(r"# (\S+/lm.tar.gz): the \d+ files git lists in .*", files).group(1)
  assert scp == f"gcloud compute tpus tpu-vm scp --zone us-east5-a --project proj --worker=all {archive} 'pod7:~/lm.tar.gz'"
  assert install.startswith("gcloud compute tpus tpu-vm ssh pod7 --zone us-east5-a --project proj --worker=all --command")
  assert "pip install -q -e" in install and ".[tpu]" in install
  assert run.endswith("'mkdir -p ~/lm-logs && cd lm && { LM_DISTRIBUTED=auto setsid nohup python3 -m launch.train "
                      "--config configs/7b.yaml --workdir /mnt/runs/7b train.learning_rate=1e-4 "
                      ">> ~/lm-logs/r1.log 2>&1 < /dev/null & }'")  # a relaunch of r1 (a resume) keeps what ended the last
  assert follow.endswith("--worker=0 --command 'tail -f ~/lm-logs/r1.log'")
  without = launch("tpu_pod", "--tpu", "pod7", "--zone", "z", "--", "train", "--workdir", "/mnt/r", env={"PATH": "/nonexistent"})
  assert (without.returncode, without.stderr) == (1, "error: gcloud is not on PATH; install the Google Cloud CLI, or see the commands with --dry-run\n")


def test_lm_train_takes_the_tiny_preset_from_any_directory(tmp_path, monkeypatch):
  from launch import train
  from lm import loop
  taken = []
  monkeypatch.setattr(loop, "run", lambda cfg, workdir, init_from=None: taken.append(cfg))
  monkeypatch.chdir(tmp_path)  # not the checkout: a relative default would name nothing here
  assert train.main(["--workdir", "w", "--sample-prompt="]) == 0
  assert taken == [config.load(ROOT / "configs" / "tiny.yaml")]


def test_tpu_pod_run_command_returns_while_the_run_goes_on(tmp_path):
  """As ssh runs it: the command's streams close at once (ssh waits for that), the run's go to its log."""
  from launch.tpu_pod import commands
  run = commands("pod7", "z", None, ["train", "--workdir", "/mnt/r"], "a.tar.gz", "r1", ["XLA_FLAGS=--a --b=$1"])[-1][-1]
  (tmp_path / "lm").mkdir()
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "python3").write_text('#!/bin/sh\necho "started with $XLA_FLAGS"\nsleep 5\n')  # a run that takes a while
  (tmp_path / "bin" / "python3").chmod(0o755)
  env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
  shell = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=4)
  assert shell.returncode == 0 and shell.stdout == ""
  deadline = time.monotonic() + 4
  while "started with --a --b=$1" not in ((tmp_path / "lm-logs" / "r1.log").read_text() if (tmp_path / "lm-logs" / "r1.log").exists() else ""):
    assert time.monotonic() < deadline
    time.sleep(0.05)


def test_tpu_pod_refuses_output_that_the_next_launch_would_delete(capsys):
  from launch.tpu_pod import main
  base = ["--tpu", "pod7", "--zone", "z", "--dry-run"]
  for args, message in (
      (["--", "train", "--workdir", "out/7b"], "'out/7b' would be inside each worker's ~/lm, which every launch replaces"),
      (["--", "sample", "--workdir", "/mnt/r", "--prompt", "x", "--output=done.jsonl"], "'done.jsonl' would be inside"),
      (["--run-name", "exp/1", "--", "train", "--workdir", "/mnt/r"], "--run-name 'exp/1' names a log file: use letters, digits"),
      (["--env", "XLA FLAGS=1", "--", "train", "--workdir", "/mnt/r"], "--env 'XLA FLAGS=1' is not KEY=VALUE with KEY a variable name"),
  ):
    with pytest.raises(SystemExit) as e:
      main(base + args)
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")
  assert main(base + ["--", "train", "--workdir", "runs/7b"]) == 0  # runs/ survives a launch


def test_tpu_pod_ships_what_git_lists_and_replaces_the_remote_tree(tmp_path):
  from launch.tpu_pod import ARCHIVE, shipped_files, unpack, write_archive

  local = tmp_path / "local"
  (local / "runs" / "old").mkdir(parents=True)
  (local / "runs" / "old" / "metrics.jsonl").write_text("{}\n")
  (local / ".gitignore").write_text("runs/\n")
  (local / "kept.py").write_text("new = 1\n")
  subprocess.run(["git", "init", "-q", str(local)], check=True)
  subprocess.run(["git", "-C", str(local), "add", "kept.py"], check=True)
  (local / "kept.py").write_text("new = 2\n")  # edited after `git add`: the edit ships
  (local / "untracked.py").write_text("")
  files = shipped_files(local)
  assert files == [".gitignore", "kept.py", "untracked.py"]
  home = tmp_path / "home"
  (home / "lm" / "runs").mkdir(parents=True)  # a worker that ran an older copy
  (home / "lm" / "runs" / "log.txt").write_text("keep me")
  (home / "lm" / "stale.py").write_text("")
  (home / "lm" / "kept.py").write_text("new = 0\n")
  write_archive(local, files, home / ARCHIVE)
  subprocess.run(["bash", "-c", unpack()], cwd=home, check=True)
  assert sorted(p.relative_to(home / "lm").as_posix() for p in (home / "lm").rglob("*")) == [
      ".gitignore", "kept.py", "runs", "runs/log.txt", "untracked.py"]
  assert (home / "lm" / "kept.py").read_text() == "new = 2\n" and not (home / ARCHIVE).exists()


def gpus_jax_takes(rank_line: str, monkeypatch) -> list[int]:
  """The GPUs (node numbering) `jax.distributed.initialize()` gives a rank: JAX's own SLURM detection
  under the rank's variables, as in jax._src.distributed."""
  from jax._src.clusters import ClusterEnv
  env = dict(word.split("=", 1) for word in rank_line.split() if "=" in word and word.split("=")[0].isupper())
  for key in [k for k in os.environ if k.startswith("SLURM_") or k == "JAX_LOCAL_DEVICE_IDS"]:
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("SLURM_JOB_ID", "7")  # and the nodes of the step, which srun sets too
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[0-1]")
  ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")] if "JAX_LOCAL_DEVICE_IDS" in env else None
  *_, ids = ClusterEnv.auto_detect_unset_distributed_params("node0:1234", None, None, ids, None, 60)
  visible = [int(v) for v in env["CUDA_VISIBLE_DEVICES"].split(",")]
  return [visible[i] for i in ids]  # an id past the visible ones fails as an invalid device ordinal


def test_slurm_dry_run_gives_each_gpu_to_one_process(monkeypatch):
  out = launch("slurm", "--nodes", "2", "--gpus-per-node", "4", "--dry-run", "--", "train", "--workdir", "/shared/run")
  assert out.returncode == 0, out.stderr
  assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4" in out.stdout
  # the interpreter that launched it (its environment's packages), as the script's cd names this checkout
  assert f"srun --kill-on-bad-exit=1 {sys.executable} -m launch.train --workdir /shared/run\n" in out.stdout
  ranks = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
  assert len(ranks) == 8 and ranks[5].startswith("rank 5: node 1 SLURM_PROCID=5 SLURM_NTASKS=8 SLURM_LOCALID=1 ")
  assert ranks[5].endswith(f" {sys.executable} -m launch.train --workdir /shared/run")
  for node in (0, 1):
    assert [gpus_jax_takes(line, monkeypatch) for line in ranks[4 * node:4 * node + 4]] == [[0], [1], [2], [3]]
  per_node = launch("slurm", "--nodes", "2", "--gpus-per-node", "4", "--process-per", "node", "--dry-run", "--", "sample",
                    "--workdir", "/shared/run", "--prompt", "hi there")
  assert "\nexport JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in per_node.stdout
  ranks = [line for line in per_node.stdout.splitlines() if line.startswith("rank ")]
  assert len(ranks) == 2 and "--prompt 'hi there'" in ranks[1]
  assert [gpus_jax_takes(line, monkeypatch) for line in ranks] == [[0, 1, 2, 3]] * 2


def test_slurm_errors(tmp_path):
  out = launch("slurm", "--nodes", "0", "--dry-run", "--", "train", "--workdir", "/shared/run")
  assert out.returncode == 2 and out.stderr.strip() == "error: --nodes=0 and --gpus-per-node=8 must be at least 1"
  out = launch("slurm", "--nodes", "1", "--job-name", "my run", "--dry-run", "--", "train", "--workdir", "/shared/run")
  assert "#SBATCH --job-name='my run'\n" in out.stdout  # sbatch would take "my" alone
  out = launch("slurm", "--nodes", "1", "--", "train", "--workdir", "/shared/run", env={"PATH": str(tmp_path)})
  assert out.returncode == 1
  assert out.stderr.strip() == "error: sbatch is not on PATH: run this on a SLURM login node, or print the script with --dry-run"


def test_slurm_script_sends_the_preemption_term_to_the_tasks():
  """Not to the batch shell (`B:`), nor through srun: srun answers a TERM with a SIGKILL of every task
  (Slurm's srun_job.c), so the trainers never saved."""
  from launch.slurm import batch_script
  script = batch_script(1, 1, "gpu", ["train"], "lm", "1:00")
  assert "#SBATCH --signal=TERM@120" in script and "trap" not in script
  assert script.splitlines()[-1].startswith("srun --kill-on-bad-exit=1 ")  # in the foreground: the job ends with it


def test_launchers_reject_an_unknown_entry_point():
  for module, args in (("slurm", ["--nodes", "1"]), ("tpu_pod", ["--tpu", "a", "--zone", "b"]),
                       ("local_cluster", ["--processes", "2"])):
    out = launch(module, *args, "--", "evaluate")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: after --, name one of train, sample and its arguments (got evaluate)"


def aot_total(out: str, label: str = "total per chip") -> float:
  """A memory figure from launch.aot's table, in bytes."""
  number, unit = re.search(rf"^{label}\s+([\d.]+) (GB|MB)", out, re.M).groups()
  return float(number) * (1e9 if unit == "GB" else 1e6)


@pytest.mark.slow
def test_aot_compiles_tiny_for_a_tpu_topology_and_memory_grows_with_batch():
  base = ["--config", "configs/tiny.yaml", "--topology", "v5e-4", "model.vocab_size=2048", "mesh.data=1", "mesh.fsdp=-1"]
  small = launch("aot", *base, "train.batch_size=8", "--sample", "4,128,128")  # settings on both sides of options
  large = launch("aot", *base, "train.batch_size=64", "--slices", "2", "--sample", "8,128,128", "--quantize", "int8",
                 "--kv-cache", "int8")
  assert small.returncode == 0, small.stderr
  assert large.returncode == 0, large.stderr
  assert "topology                           v5e-4 x1: 4 chips, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in small.stdout
  # two slices: `data` (size 1 per slice, as the 7B preset sets it) runs across them, fsdp within one
  assert "topology                           v5e-4 x2: 8 chips, mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in large.stdout
  per_index = re.search(r"^data indices per slice\s+(.*)$", large.stdout, re.M).group(1)
  assert per_index == "data 0: slice [0]; data 1: slice [1]"
  assert "fits" in small.stdout and "implied MFU" in small.stdout
  # a tiny model's sizes in units that show them (not 0.00B parameters, 0.00 TFLOP)
  assert re.search(r"^model\s+[1-9][\d.]*M parameters", small.stdout, re.M), small.stdout
  assert re.search(r"^model FLOPs per chip per step\s+[1-9][\d.]* GFLOP", small.stdout, re.M), small.stdout
  assert "tokens/s" not in small.stdout  # XLA's time counts the layer scan's body once: no throughput follows from it
  assert aot_total(large.stdout) > aot_total(small.stdout)
  # model.attention=auto picks the kernel on TPU, for training and for the sampler's prefill
  assert len(re.findall(r"^attention\s+splash kernel", small.stdout, re.M)) == 2
  m = config.load("configs/tiny.yaml").model  # keys and values of every layer, 4 rows x 256 slots, rows over 4 chips
  cache = 2 * m.num_layers * 4 * 256 * m.num_kv_heads * (m.d_model // m.num_heads) * 4 / 4
  assert aot_total(small.stdout, "KV cache per chip") == pytest.approx(cache, rel=0.01)
  # --kv-cache int8, 8 rows over 8 chips: a byte per value and a float32 scale per token and kv head
  int8_cache = 2 * m.num_layers * 1 * 256 * m.num_kv_heads * (m.d_model // m.num_heads + 4)
  assert aot_total(large.stdout, "KV cache per chip") == pytest.approx(int8_cache, rel=0.03)
  assert aot_total(small.stdout, "decode total per chip") > cache
  assert aot_total(small.stdout, "  of which weight all-gathers") > 0  # mesh.fsdp=-1: the FSDP sampling mesh
  # int8 weights: at most 0.55x a bfloat16 copy of the float32 parameters the plain sampler holds
  sampler_params = lambda out: aot_total(out[out.index("\nsampling"):], "parameters per chip")
  assert sampler_params(large.stdout) <= 0.55 * sampler_params(small.stdout) / 2
  args = lambda out: aot_total(out, r"decode arguments per chip \(XLA\)")
  assert args(large.stdout) < args(small.stdout)



def test_v4_and_v5p_topologies_have_one_device_per_chip():
  """Both name TensorCores, two a chip, and run each chip as one device (megacore): v4-8 and v5p-8 are 4."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from launch import aot
  cfg = config.load("configs/tiny.yaml", ["model.vocab_size=2048"])
  for name in ("v4-8", "v5p-8"):
    family, dims = aot.topology_shape(name)
    assert aot.topology_mesh(cfg, family, dims, 1).devices.size == 4, name

HLO = """HloModule decode

%greedy (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %r = f32[4]{0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%sample (p: f32[4]) -> f32[16] {
  %p = f32[4]{0} parameter(0)
  ROOT %g = f32[16]{0} all-gather(%p), dimensions={0}
}

%step (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %s = bf16[8,2]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add
  %c = f32[4]{0} conditional(%i, %x, %x), branch_computations={%greedy, %sample}
}

%more (t: (s32[], f32[4])) -> pred[] {
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%more, body=%step
}
"""


def test_collectives_count_loop_bodies_by_their_trips_and_one_branch_of_a_conditional():
  """16 steps on 4 devices, each an all-reduce of 8 x 2 bfloat16 and one of two branches: the one
  sending more, an all-gather of 16 float32 (48 bytes sent) over an all-reduce of 4 (24)."""
  from launch import aot
  found = aot.collectives(HLO, 4)
  assert sorted(found) == [("all-gather", (16,), 64, 16, 4), ("all-reduce", (8, 2), 32, 16, 4)]
  assert [aot.traffic(kind, b, n) for kind, _, b, _, n in sorted(found)] == [48, 48]  # 3/4 of 64; 2 x 3/4 of 32


def test_collective_groups_are_read_in_each_form_xla_prints():
  from launch import aot
  for groups, n in (("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4), ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=2] {'axis_1','axis_2'}", 2),
                    ("[2,4]<=[8]", 4), ("{{0,1},{2,3},{4,5},{6,7}}", 2), ("{}", 8)):
    assert aot.group_size(f"%g = f32[8]{{0}} all-gather(%x), replica_groups={groups}, dimensions={{0}}", 8) == n, groups
  # an async op: counted once, at its -done, over the groups its -start names
  for operand in ("%ag-start", "(f32[8]{0}, f32[16]{0}) %ag-start"):  # as TPU and GPU modules print it
    async_hlo = ("ENTRY %main (x: f32[8]) -> f32[16] {\n"
                 "  %ag-start = (f32[8]{0}, f32[16]{0}) all-gather-start(%x), replica_groups={{0,1},{2,3}}, dimensions={0}\n"
                 f"  ROOT %ag-done = f32[16]{{0}} all-gather-done({operand}), metadata={{op_name=\"x\"}}\n}}\n")
    assert aot.collectives(async_hlo, 4) == [("all-gather", (16,), 64, 1, 2)], operand
  assert aot.traffic("reduce-scatter", 10, 4) == 30 and aot.traffic("collective-permute", 10, 4) == 10
  assert aot.traffic("all-reduce", 10, 1) == 0  # a group of one device moves nothing


@pytest.mark.slow
def test_the_default_decode_mesh_gathers_no_weight_on_a_tpu_topology():
  """Deviceless v5e-4: tensor over the 2 kv heads, data over slots. The compiled decode loop gathers
  no weight (embedding included); the training FSDP mesh gathers every layer's, one layer at a time."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from launch import aot

  meshes = lambda overrides: [o for o in overrides if o.startswith("mesh.")]  # what launch.aot passes on
  model = ["model.vocab_size=2048", "model.num_layers=2", "model.max_seq_len=64", "train.seq_len=64"]
  # 8 layers of 16.8M float32 weights: 67.2 MB a layer gathered
  wide = ["model.num_layers=8", "model.d_model=1024", "model.num_heads=8", "model.num_kv_heads=8", "model.d_ff=4096"]
  decode = sampling_config(config.load("configs/tiny.yaml", model), 4)
  as_training = model + wide + ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]  # as lm-sample takes them
  fsdp = sampling_config(config.load("configs/tiny.yaml", as_training), 4, meshes(as_training))
  # a training mesh's overrides change the decode mesh as they change lm-sample's: with tensor=4 over the
  # 8 kv heads, fsdp=-1 is left no device, so no FSDP mesh (the README's 7B case)
  training_mesh = model + wide + ["mesh.data=1", "mesh.fsdp=-1"]
  sampling = sampling_config(config.load("configs/tiny.yaml", training_mesh), 4, meshes(training_mesh))
  assert dict(sharding.make_mesh(sampling.mesh, jax.devices()[:4]).shape) == {"data": 1, "fsdp": 1, "tensor": 4}
  family, dims = aot.topology_shape("v5e-4")
  reports = {}
  for name, c in (("decode", decode), ("fsdp", fsdp)):
    reports[name] = aot.compile_sampler(c, aot.topology_mesh(c, family, dims, 1), family, 4, 16, 16)
    assert dict(reports[name]["rows"])["decode mesh"].startswith({"decode": "{'data': 2, 'fsdp': 1, 'tensor': 2}",
                                                                  "fsdp": "{'data': 1, 'fsdp': 4, 'tensor': 1}"}[name])
  assert reports["decode"]["weight_gather_bytes"] == 0 < reports["fsdp"]["weight_gather_bytes"]
  # two slices: each its own decode mesh, the slices stacked along data (the training table comes first)
  two = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--slices", "2", "--sample", "4,16,16", *model)
  assert two.returncode == 0, two.stderr
  assert re.search(r"^decode mesh\s+\{'data': 4, 'fsdp': 1, 'tensor': 2\}", two.stdout, re.M), two.stdout
  assert aot_total(two.stdout, "  of which weight all-gathers") == 0
  # 4096 slots of 8192 positions: a 25.8 GB cache per 16 GB chip is a row of the table, not XLA's traceback
  big = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4096,16,8176", *model[:1],
               "model.max_seq_len=8192")
  assert big.returncode == 1 and "Traceback" not in big.stderr, big.stderr
  assert re.search(r"^decode total per chip\s+more than 17.18 GB HBM: DOES NOT FIT \(RESOURCE_EXHAUSTED: ", big.stdout, re.M), big.stdout
  assert re.search(r"^total per chip\s+.* HBM: fits$", big.stdout, re.M)  # the training table still comes first
  # a training mesh override that leaves the decode mesh (tensor=4 over 8 kv heads) too many devices
  odd = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4,16,16", *model,
               "model.num_heads=8", "model.num_kv_heads=8", "mesh.fsdp=2")
  assert odd.returncode == 1 and re.search(r"^total per chip\s+.* HBM: fits$", odd.stdout, re.M), odd.stderr
  assert re.search(r"^decode mesh\s+none: mesh data=1 fsdp=2 tensor=4 needs 8 devices, but 4 are available$", odd.stdout, re.M)
  temporaries = aot_total("\n".join(f"{k} {v}" for k, v in reports["fsdp"]["rows"]), r"decode temporaries per chip \(XLA\)")
  assert temporaries < 67.2e6  # never many layers' gathered weights at once (0.31 GB when the TPU prefetched them)


@pytest.mark.slow
def test_aot_fit_finds_a_batch_that_fits_where_twice_it_does_not():
  # logits of a 512k vocabulary dominate: about 10 GB per row of 4096 tokens, on 16 GiB chips
  base = ["--config", "configs/tiny.yaml", "--topology", "v5e-4", "model.vocab_size=524288", "model.num_layers=1",
          "model.d_model=64", "model.d_ff=128", "model.max_seq_len=4096", "train.seq_len=4096", "model.attention=xla"]
  fit = launch("aot", *base, "train.batch_size=8", "model.remat=save_matmuls", "--fit")
  assert fit.returncode == 0, fit.stderr
  batch, remat = re.search(r"^overrides to use\s+train.batch_size=(\d+) model.remat=(\w+)$", fit.stdout, re.M).groups()
  batch = int(batch)
  assert batch == 4 and re.search(rf"^batch\s+{batch} x 4096 tokens", fit.stdout, re.M)
  # the logits dominate, so no remat (the cheapest) fits the batch save_matmuls fits, and the table is for it
  assert remat == "none" and re.search(r"^model\s+.*, remat none$", fit.stdout, re.M)
  assert re.search(r"^largest batch that fits\s+4 \(searched in steps of 4, remat save_matmuls, 2 compiles\); "
                   r"train.batch_size=8 needs [\d.]+ GB per chip", fit.stdout, re.M)
  assert re.search(r"^total per chip .*: fits$", fit.stdout, re.M)
  twice = launch("aot", *base, f"train.batch_size={2 * batch}", "--sample", "4,16,16")  # the sampler's table still comes
  assert twice.returncode == 1 and "Traceback" not in twice.stderr
  assert re.search(r"^decode total per chip\s+.* HBM: fits$", twice.stdout, re.M), twice.stdout
  assert re.fullmatch(rf"error: train.batch_size={2 * batch} needs ([\d.]+) GB per chip, a v5e chip has 17.18 GB",
                      twice.stderr.strip())
  assert float(re.search(r"needs ([\d.]+) GB", twice.stderr).group(1)) > 17.18


# GB per chip the 7B preset on v5p-8 measured at 1, 2, 43, 51, 52 and 53 units of 4 rows (README)
MEASURED_7B = ([1, 2, 43, 51, 52, 53], [32.60, 34.24, 90.23, 99.56, 100.87, 102.19])


@pytest.mark.parametrize("memory, most", [
    (lambda k: float(np.interp(k, *MEASURED_7B, right=math.inf)), 6),  # bisecting from 1024 rows: 9, 3 far over
    (lambda k: 32.6 + 1.03 * (k - 1), 4),  # affine: two compiles predict, two confirm
    (lambda k: 2 * k * k / 10, 10),  # far from affine
    (lambda k: 2 * k * k / 10 if k < 15 else math.inf, 10),  # XLA names no size past 15
    (lambda k: 200, 1),  # nothing fits
])
def test_the_fit_search_agrees_with_a_scan_in_few_compiles(memory, most):
  from launch.aot import largest_fitting

  attempts = []

  def attempt(k: int) -> tuple[float, bool]:
    attempts.append(k)
    return memory(k), memory(k) <= 102

  found = largest_fitting(attempt, 102)
  assert found == max((k for k in range(1, 1000) if memory(k) <= 102), default=0)
  assert {found, found + 1} - {0} <= set(attempts)  # the answer and one more were tried, not just predicted
  assert len(attempts) <= most


def test_aot_errors(tmp_path):
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v9-8")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --topology 'v9-8' is not one of v4-N, v5e-N, v5p-N, v6e-N (for example v5e-16, v5p-8)"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4,128")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --sample '4,128' is not ROWS,PROMPT,NEW with three positive numbers (for example 16,1024,1024)"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--slices", "2", "mesh.slices=3",
               "model.vocab_size=2048")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: mesh.slices=3, but the 8 devices come from 2 slice(s); set it to 2 or 0"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--slices", "0")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --slices=0 must be at least 1"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4,128,128", "--quantize", "int4")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --quantize 'int4' is not one of: int8"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4,128,128", "--kv-cache", "fp8")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --kv-cache 'fp8' is not one of: int8"
  (tmp_path / "libtpu.py").write_text("raise ImportError('not installed')\n")
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", env={"PYTHONPATH": str(tmp_path)})
  assert out.returncode == 1
  assert out.stderr.strip() == "error: launch.aot needs libtpu: pip install -e '.[tpu]'"


def test_local_cluster_stops_the_others_when_any_process_fails():
  """Also one after a process still running (it was never polled, and the launcher waited for the
  others for ever); a process killed by a signal is 128 + its number, as a shell says."""
  from launch.local_cluster import supervise
  blocked = "import time; time.sleep(120)"  # as in a collective that waits for the one that failed
  for codes, want in ((["sys.exit(0)", blocked, "sys.exit(3)"], 3), ([blocked, "os.kill(os.getpid(), 9)"], 137)):
    procs = [subprocess.Popen([sys.executable, "-c", f"import os, sys; {code}"]) for code in codes]
    try:
      assert supervise(procs) == want
      assert all(proc.returncode is not None for proc in procs)
    finally:
      for proc in procs:
        proc.kill()
