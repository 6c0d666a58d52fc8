"""Joining a multi-process job: one process per host (TPU VM, SLURM node or rank), or several
simulated hosts on one machine (launch.local_cluster)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.config import ConfigError, flatten

# Set by launch.local_cluster; on TPU pods and SLURM, LM_DISTRIBUTED=auto lets JAX read the cluster.
COORDINATOR, NUM_PROCESSES, PROCESS_ID = "LM_COORDINATOR_ADDRESS", "LM_NUM_PROCESSES", "LM_PROCESS_ID"
TIMEOUT = "LM_DISTRIBUTED_TIMEOUT"
ERROR_BYTES = 4096  # of an error line that processes share
T = TypeVar("T")


def timeout_s() -> int:
  value = os.environ.get(TIMEOUT, "120")
  if not (value.isdigit() and int(value) > 0):
    raise ConfigError(f"{TIMEOUT}={value!r} must be a whole number of seconds, at least 1")
  return int(value)


def initialize() -> None:
  """Calls `jax.distributed.initialize` where the environment describes a multi-process job."""
  if os.environ.get(COORDINATOR):
    address, process, timeout = os.environ[COORDINATOR], int(os.environ[PROCESS_ID]), timeout_s()
    if process != 0 and not reachable(address, timeout):  # jax would abort the process instead
      raise ConfigError(f"process {process}: could not reach coordinator {address} within {timeout}s")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(os.environ[NUM_PROCESSES]),
                               process_id=process, initialization_timeout=timeout)
  elif os.environ.get("LM_DISTRIBUTED") == "auto":
    jax.distributed.initialize(initialization_timeout=timeout_s())


def reachable(address: str, timeout_s: float) -> bool:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return True
    except OSError:
      time.sleep(0.2)
  return False


def check_same_config(settings: dict[str, Any]) -> None:
  """Every process must run the same settings; the one that differs names its differences."""
  if jax.process_count() == 1:
    return
  text = json.dumps(settings, sort_keys=True)
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
  digests = multihost_utils.process_allgather(digest).reshape(-1)
  odd = [p for p, d in enumerate(digests) if d != digests[0]]
  if not odd:
    return
  reference = json.loads(bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(text.encode().ljust(1 << 16), np.uint8))).rstrip(b" ").decode())
  mine = jax.process_index()
  if mine in odd:
    ours, theirs = flatten(settings), flatten(reference)
    keys = [f"{k}: {theirs.get(k)!r} on process 0, {ours.get(k)!r} here" for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    raise ConfigError(f"process {mine} runs other settings than process 0: {'; '.join(keys)}")
  raise ConfigError(f"process(es) {odd} run other settings than process 0; their logs name the keys")


def all_or_none(fn: Callable[..., T], *args: Any) -> T:
  """`fn(*args)` on every process, or, where it raised a ConfigError on any, the first such error on
  every process: one that failed alone (a file its host lacks, a listing that lags) would leave the
  others waiting for it at their next collective."""
  try:
    result, error = fn(*args), None
  except ConfigError as e:
    if jax.process_count() == 1:
      raise
    result, error = None, str(e)
  if jax.process_count() > 1:
    mine = b"" if error is None else b"\1" + error.encode()  # a flag byte first: an error may say nothing
    rows = multihost_utils.process_allgather(np.frombuffer(mine[:ERROR_BYTES].ljust(ERROR_BYTES, b"\0"), np.uint8))
    failed = [(p, bytes(row[1:]).rstrip(b"\0").decode(errors="replace")) for p, row in enumerate(rows) if row[0]]
    if failed:
      p, message = failed[0]
      raise ConfigError(message if p == jax.process_index() else f"process {p}: {message}")
  return result


def from_first(value: Any) -> Any:
  """Process 0's `value` (anything JSON holds) on every process: what one host alone may see, such as
  a file on its own disk."""
  if jax.process_count() == 1:
    return value
  data = json.dumps(value).encode() if jax.process_index() == 0 else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(data.ljust(size), np.uint8))))
