"""Run the trainer (or sampler) on every worker of a Cloud TPU VM slice:
python -m launch.tpu_pod --tpu NAME --zone ZONE [--project P] [--run-name NAME] [--env KEY=VALUE ...] [--dry-run] -- train|sample ARGS

Ships the files git lists here (tracked and untracked, not ignored: no .git, no run directories) as
one archive to every worker, replaces the worker's ~/lm with them (keeping its runs/), installs it
with the TPU extra, then starts the same command on all workers at once, detached from the ssh
session, each worker appending its output to ~/lm-logs/RUN_NAME.log. Each worker's JAX finds the
others itself (LM_DISTRIBUTED=auto); `--env` sets more of the command's environment there (such as
LIBTPU_INIT_ARGS, XLA_FLAGS or LM_DISTRIBUTED_TIMEOUT). The work directory must be storage every
worker sees (a Filestore/NFS mount, or a gcsfuse-mounted bucket).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from launch.common import entry_command, python_module

ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR = "lm"
ARCHIVE = "lm.tar.gz"
LOGS = "lm-logs"
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def shipped_files(root: Path) -> list[str]:
  """What git sees in the working tree, edits not yet committed included."""
  if not shutil.which("git"):
    raise SystemExit("error: launch.tpu_pod ships the files git lists, but git is not on PATH")
  out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"error: launch.tpu_pod ships the files git lists, but {root} is not a git checkout")
  return sorted(f for f in out.stdout.split("\0") if f and (root / f).is_file())


def write_archive(root: Path, files: list[str], path: Path) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for f in files:
      tar.add(root / f, arcname=f)


def unpack() -> str:
  """Shell run on each worker: ~/lm becomes exactly the archive's files, its runs/ kept."""
  return (f"mkdir -p {REMOTE_DIR} && find {REMOTE_DIR} -mindepth 1 -maxdepth 1 ! -name runs -exec rm -rf {{}} + && "
          f"tar -xzf {ARCHIVE} -C {REMOTE_DIR} && rm {ARCHIVE}")


def commands(tpu: str, zone: str, project: str | None, command: list[str], archive: str, run_name: str,
             env: list[str] = ()) -> list[list[str]]:
  where = ["--zone", zone] + (["--project", project] if project else [])
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *where, "--worker=all", "--command"]
  log = f"~/{LOGS}/{shlex.quote(run_name)}.log"
  install = f"{unpack()} && cd {REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'"
  # setsid + nohup with every stream redirected: ssh returns at once and a dropped connection leaves the run alive.
  # Only the run goes to the background ({ ... & }): `a && b && run &` would keep a shell, holding ssh's
  # streams, until the run ends. A relaunch appends to the log, keeping the last run's end.
  assignments = " ".join(f"{key}={shlex.quote(value)}" for key, _, value in (e.partition("=") for e in ["LM_DISTRIBUTED=auto", *env]))
  run = (f"mkdir -p ~/{LOGS} && cd {REMOTE_DIR} && {{ {assignments} setsid nohup "
         f"{shlex.join(python_module(command))} >> {log} 2>&1 < /dev/null & }}")
  return [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", *where, "--worker=all", archive, f"{tpu}:~/{ARCHIVE}"],
      [*ssh, install],
      [*ssh, run],
  ]


def written_paths(command: list[str]) -> list[str]:
  """The paths the command writes to: `--workdir` and `--output` values."""
  out = []
  for i, arg in enumerate(command):
    name, eq, value = arg.partition("=")
    if name in ("--workdir", "--output"):
      out += [value] if eq else command[i + 1:i + 2]
  return out


def check(command: list[str], run_name: str, env: list[str]) -> str | None:
  """What would make the launch lose output or fail on the workers, if anything."""
  if not RUN_NAME.fullmatch(run_name):
    return f"--run-name '{run_name}' names a log file: use letters, digits, '.', '_' and '-'"
  if bad := [e for e in env if not ENV_NAME.fullmatch(e.partition("=")[0]) or "=" not in e]:
    return f"--env '{bad[0]}' is not KEY=VALUE with KEY a variable name"
  for path in written_paths(command):
    if not Path(path).is_absolute() and Path(path).parts[:1] != ("runs",):
      return (f"'{path}' would be inside each worker's ~/{REMOTE_DIR}, which every launch replaces (only its runs/ is kept): "
              f"write under runs/ (a slice of one host), or to an absolute path on storage every worker sees")
  return None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="tpu_pod", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project")
  parser.add_argument("--run-name", default=time.strftime("%Y%m%d-%H%M%S"), help="names each worker's log file")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in the command's environment on every worker (repeatable)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train|sample ARGS")
  args = parser.parse_args(argv)
  command = entry_command(parser, args.command)
  if problem := check(command, args.run_name, args.env):
    parser.exit(2, f"error: {problem}\n")
  if not args.dry_run and not shutil.which("gcloud"):
    parser.exit(1, "error: gcloud is not on PATH; install the Google Cloud CLI, or see the commands with --dry-run\n")
  files = shipped_files(ROOT)
  where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
  follow = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *where, "--worker=0", "--command",
            f"tail -f ~/{LOGS}/{args.run_name}.log"]
  with tempfile.TemporaryDirectory() as tmp:
    archive = Path(tmp) / ARCHIVE
    if args.dry_run:
      print(f"# {archive}: the {len(files)} files git lists in {ROOT}")
    else:
      write_archive(ROOT, files, archive)
    for cmd in commands(args.tpu, args.zone, args.project, command, str(archive), args.run_name, args.env):
      if args.dry_run:
        print(shlex.join(cmd))
        continue
      status = subprocess.run(cmd).returncode
      if status:
        print(f"error: {shlex.join(cmd[:5])} ... exited with {status}", file=sys.stderr)
        return status
  print(f"# worker 0's log: {shlex.join(follow)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
