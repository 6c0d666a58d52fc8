"""Cluster launch scripts (dry runs) and the ahead-of-time TPU compile."""

import os
import re
import subprocess
import sys

import pytest

from lm import config
from tests.conftest import ROOT


def launch(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=900)


def test_tpu_pod_dry_run_prints_copy_install_and_run_on_every_worker():
  out = launch("tpu_pod", "--tpu", "pod7", "--zone", "us-east5-a", "--project", "proj", "--dry-run", "--",
               "train", "--config", "configs/7b.yaml", "--workdir", "/mnt/runs/7b", "train.learning_rate=1e-4")
  assert out.returncode == 0, out.stderr
  scp, install, run = out.stdout.strip().splitlines()
  assert scp == f"gcloud compute tpus tpu-vm scp --recurse --zone us-east5-a --project proj --worker=all {ROOT} 'pod7:~/lm'"
  assert install.startswith("gcloud compute tpus tpu-vm ssh pod7 --zone us-east5-a --project proj --worker=all --command")
  assert "pip install -q -e" in install and ".[tpu]" in install
  assert run.endswith("'cd lm && LM_DISTRIBUTED=auto python3 -m launch.train --config configs/7b.yaml "
                      "--workdir /mnt/runs/7b train.learning_rate=1e-4'")


def test_slurm_dry_run_prints_the_script_and_every_rank():
  out = launch("slurm", "--nodes", "2", "--gpus-per-node", "4", "--dry-run", "--", "train", "--workdir", "/shared/run")
  assert out.returncode == 0, out.stderr
  assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4" in out.stdout
  assert "srun --kill-on-bad-exit=1 --gpus-per-task=1 python3 -m launch.train --workdir /shared/run" in out.stdout
  ranks = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
  assert len(ranks) == 8
  assert ranks[5] == ("rank 5: node 1 SLURM_PROCID=5 SLURM_NTASKS=8 SLURM_LOCALID=1 CUDA_VISIBLE_DEVICES=1 "
                      "LM_DISTRIBUTED=auto python3 -m launch.train --workdir /shared/run")
  per_node = launch("slurm", "--nodes", "2", "--gpus-per-node", "4", "--process-per", "node", "--dry-run", "--", "sample",
                    "--workdir", "/shared/run", "--prompt", "hi there")
  ranks = [line for line in per_node.stdout.splitlines() if line.startswith("rank ")]
  assert len(ranks) == 2 and "CUDA_VISIBLE_DEVICES=0,1,2,3" in ranks[1] and "--prompt 'hi there'" in ranks[1]


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
  small = launch("aot", *base, "train.batch_size=8", "--sample", "4,128,128")
  large = launch("aot", *base, "train.batch_size=64", "--sample", "4,128,128", "--quantize", "int8")
  assert small.returncode == 0, small.stderr
  assert large.returncode == 0, large.stderr
  assert "topology                           v5e-4 x1: 4 chips, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in small.stdout
  assert "fits" in small.stdout and "implied MFU" in small.stdout
  assert aot_total(large.stdout) > aot_total(small.stdout)
  # model.attention=auto picks the kernel on TPU, for training and for the sampler's prefill
  assert len(re.findall(r"^attention\s+splash kernel", small.stdout, re.M)) == 2
  m = config.load("configs/tiny.yaml").model  # keys and values of every layer, 4 rows x 256 slots, rows over 4 chips
  cache = 2 * m.num_layers * 4 * 256 * m.num_kv_heads * (m.d_model // m.num_heads) * 4 / 4
  assert aot_total(small.stdout, "KV cache per chip") == pytest.approx(cache, rel=0.01)
  assert aot_total(small.stdout, "decode total per chip") > cache
  # int8 weights: at most 0.55x a bfloat16 copy of the float32 parameters the plain sampler holds
  sampler_params = lambda out: aot_total(out[out.index("\nsampling"):], "parameters per chip")
  assert sampler_params(large.stdout) <= 0.55 * sampler_params(small.stdout) / 2
  args = lambda out: aot_total(out, r"decode arguments per chip \(XLA\)")
  assert args(large.stdout) < args(small.stdout)


def test_aot_errors(tmp_path):
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v9-8")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --topology 'v9-8' is not one of v4-N, v5e-N, v5p-N, v6e-N (for example v5e-16, v5p-8)"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4,128")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --sample '4,128' is not ROWS,PROMPT,NEW with three positive numbers (for example 16,1024,1024)"
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--sample", "4,128,128", "--quantize", "int4")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --quantize 'int4' is not one of: int8"
  (tmp_path / "libtpu.py").write_text("raise ImportError('not installed')\n")
  out = launch("aot", "--config", "configs/tiny.yaml", "--topology", "v5e-4", env={"PYTHONPATH": str(tmp_path)})
  assert out.returncode == 1
  assert out.stderr.strip() == "error: launch.aot needs libtpu: pip install -e '.[tpu]'"
