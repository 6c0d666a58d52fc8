"""Several simulated hosts on this machine: python -m launch.local_cluster --processes P
--devices-per-process D -- train|sample [their arguments]

Starts P processes on 127.0.0.1 that join one JAX job (CPU collectives through gloo), each with D
simulated CPU devices; streams their output prefixed with the process number; exits with the first
non-zero status, stopping the others. SIGTERM and SIGINT are passed on to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch.common import entry_command, python_module



def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(process: int, processes: int, devices: int, port: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]), JAX_PLATFORMS="cpu",
             LM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", LM_NUM_PROCESSES=str(processes), LM_PROCESS_ID=str(process),
             PYTHONUNBUFFERED="1")
  return env


def stream(prefix: str, pipe, out) -> None:
  for line in pipe:
    out.write(f"{prefix}{line}")
    out.flush()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="local_cluster", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, required=True)
  parser.add_argument("--devices-per-process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train|sample ARGS")
  args = parser.parse_args(argv)
  command = entry_command(parser, args.command)
  if args.processes < 1 or args.devices_per_process < 1:
    print(f"error: --processes={args.processes} and --devices-per-process={args.devices_per_process} must be at least 1", file=sys.stderr)
    return 2
  port = args.port or free_port()
  procs = []
  for p in range(args.processes):
    proc = subprocess.Popen(python_module(command, sys.executable), text=True,
                            env=child_env(p, args.processes, args.devices_per_process, port),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
      threading.Thread(target=stream, args=(f"[p{p}] ", pipe, out), daemon=True).start()

  def forward(signum, frame):
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
  status = supervise(procs)
  time.sleep(0.2)  # let the streaming threads print the last lines
  return status


def supervise(procs: list[subprocess.Popen]) -> int:
  """Waits for every process; the first that fails stops the others. Its exit status, as a shell
  gives it (128 + the signal that killed it)."""
  status = 0
  while None in [proc.poll() for proc in procs]:  # every one polled: a failure after a running one counts too
    failed = [proc.returncode for proc in procs if proc.returncode not in (None, 0)]
    if failed and not status:
      status = failed[0]
      for proc in procs:
        if proc.poll() is None:
          proc.terminate()
      deadline = time.monotonic() + 30
      while None in [proc.poll() for proc in procs] and time.monotonic() < deadline:
        time.sleep(0.1)
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
    time.sleep(0.05)
  status = status or next((proc.wait() for proc in procs if proc.wait()), 0)
  return 128 - status if status < 0 else status


if __name__ == "__main__":
  sys.exit(main())
