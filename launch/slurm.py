"""Run the trainer (or sampler) on a SLURM GPU cluster:
python -m launch.slurm --nodes N --gpus-per-node G [--process-per node|gpu] [--dry-run] -- train|sample ARGS

Writes a batch script that `srun`s one process per GPU (or one per node, owning all its GPUs) and
submits it with `sbatch`. JAX reads the SLURM environment in `jax.distributed.initialize()`
(LM_DISTRIBUTED=auto) and, unless told otherwise, gives each process the one GPU whose number is its
SLURM_LOCALID among those it sees: so every task sees all of its node's GPUs (no --gpus-per-task,
which would leave task k only one, numbered 0), and a process per node is told to take them all
(JAX_LOCAL_DEVICE_IDS). `--dry-run` prints the script and what each rank would run instead.

The preemption notice, `--signal=TERM@120`, goes to every task of the job's steps (not to the batch
shell, nor to srun, which turns a TERM into a SIGKILL of every task): each trainer saves and exits 0.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch.common import entry_command, python_module

ROOT = Path(__file__).resolve().parents[1]


def batch_script(nodes: int, gpus: int, per: str, command: list[str], job_name: str, time_limit: str) -> str:
  tasks = gpus if per == "gpu" else 1
  run = shlex.join(python_module(command, sys.executable))  # the launcher's, on the shared file system
  return "\n".join([
      "#!/bin/bash",
      f"#SBATCH --job-name={shlex.quote(job_name)}",
      f"#SBATCH --nodes={nodes}",
      f"#SBATCH --ntasks-per-node={tasks}",
      f"#SBATCH --gpus-per-node={gpus}",
      f"#SBATCH --time={time_limit}",
      "#SBATCH --signal=TERM@120  # to the tasks: the trainer saves and exits 0",
      "set -euo pipefail",
      f"cd {shlex.quote(str(ROOT))}",
      "export LM_DISTRIBUTED=auto",
      *([f"export JAX_LOCAL_DEVICE_IDS={all_gpus(gpus)}"] if per == "node" else []),
      f"srun --kill-on-bad-exit=1 {run}",
      "",
  ])


def all_gpus(gpus: int) -> str:
  return ",".join(map(str, range(gpus)))


def ranks(nodes: int, gpus: int, per: str, command: list[str]) -> list[str]:
  """What each rank would run, with the variables JAX reads."""
  tasks = gpus if per == "gpu" else 1
  run = shlex.join(python_module(command, sys.executable))  # the launcher's, on the shared file system
  take_all = f" JAX_LOCAL_DEVICE_IDS={all_gpus(gpus)}" if per == "node" else ""
  lines = []
  for rank in range(nodes * tasks):
    lines.append(f"rank {rank}: node {rank // tasks} SLURM_PROCID={rank} SLURM_NTASKS={nodes * tasks} "
                 f"SLURM_LOCALID={rank % tasks} CUDA_VISIBLE_DEVICES={all_gpus(gpus)} LM_DISTRIBUTED=auto{take_all} {run}")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus-per-node", type=int, default=8)
  parser.add_argument("--process-per", choices=("gpu", "node"), default="gpu")
  parser.add_argument("--job-name", default="lm")
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--dry-run", action="store_true", help="print the script and each rank's command")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train|sample ARGS")
  args = parser.parse_args(argv)
  command = entry_command(parser, args.command)
  if args.nodes < 1 or args.gpus_per_node < 1:
    parser.exit(2, f"error: --nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must be at least 1\n")
  script = batch_script(args.nodes, args.gpus_per_node, args.process_per, command, args.job_name, args.time)
  if args.dry_run:
    print(script)
    print("\n".join(ranks(args.nodes, args.gpus_per_node, args.process_per, command)))
    return 0
  if shutil.which("sbatch") is None:
    print("error: sbatch is not on PATH: run this on a SLURM login node, or print the script with --dry-run", file=sys.stderr)
    return 1
  return subprocess.run(["sbatch"], input=script, text=True).returncode


if __name__ == "__main__":
  sys.exit(main())
