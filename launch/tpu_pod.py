"""Run the trainer (or sampler) on every worker of a Cloud TPU VM slice:
python -m launch.tpu_pod --tpu NAME --zone ZONE [--project P] [--dry-run] -- train|sample ARGS

Copies this project to every worker, installs it with the TPU extra, then starts the same command on
all workers at once; each worker's JAX finds the others itself (LM_DISTRIBUTED=auto). The work
directory must be storage every worker sees (a Filestore/NFS mount, or a gcsfuse-mounted bucket).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from launch.common import entry_command, python_module

ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR = "lm"


def commands(tpu: str, zone: str, project: str | None, command: list[str]) -> list[list[str]]:
  where = ["--zone", zone] + (["--project", project] if project else [])
  run = f"cd {REMOTE_DIR} && LM_DISTRIBUTED=auto {shlex.join(python_module(command))}"
  install = f"cd {REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'"
  return [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *where, "--worker=all", str(ROOT), f"{tpu}:~/{REMOTE_DIR}"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *where, "--worker=all", "--command", install],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *where, "--worker=all", "--command", run],
  ]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="tpu_pod", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project")
  parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train|sample ARGS")
  args = parser.parse_args(argv)
  command = entry_command(parser, args.command)
  for cmd in commands(args.tpu, args.zone, args.project, command):
    if args.dry_run:
      print(shlex.join(cmd))
      continue
    status = subprocess.run(cmd).returncode
    if status:
      print(f"error: {shlex.join(cmd[:5])} ... exited with {status}", file=sys.stderr)
      return status
  return 0


if __name__ == "__main__":
  sys.exit(main())
