"""Orbax checkpoints: parameters, optimizer state, the grain iterator's position and the run's
description, saved asynchronously and atomically into WORKDIR/checkpoints/STEP."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lm import distributed
from lm.config import CheckpointConfig, ConfigError
from lm.tokenizer import file_digest

ITEMS = ("params", "optimizer", "data", "meta")


def run_meta(settings: dict[str, Any], tokenizer: str | Path) -> dict[str, Any]:
  """What every checkpoint says of its run: the resolved settings, the process count, and the
  tokenizer's path and digest."""
  return {"config": settings, "process_count": jax.process_count(),
          "tokenizer": {"path": str(Path(tokenizer).absolute()), "sha256": file_digest(tokenizer)}}


def run_tokenizer(workdir: str | Path, step: int, meta: dict[str, Any]) -> Path:
  """The tokenizer checkpoint `step` was trained with: where it was then, else the copy in the work
  directory; the first with the digest the checkpoint recorded (a file retrained in place is not it)."""
  path, copy = Path(meta["tokenizer"]["path"]), Path(workdir) / "tokenizer.model"
  found = [p for p in (path, copy) if p.is_file()]
  if not found:
    raise ConfigError(f"the tokenizer {workdir} was trained with, {path}, " + ("does not exist; put it back" if path == copy else
                      f"is gone and {copy} does not exist; put one of them back"))
  recorded = meta["tokenizer"].get("sha256")
  digests = {p: file_digest(p) for p in found} if recorded else {}
  if recorded and recorded not in digests.values():
    raise ConfigError(f"tokenizer '{found[0]}' has SHA-256 {digests[found[0]][:12]}..., but step {step} was trained with "
                      f"{recorded[:12]}...; restore the run's tokenizer")
  return next(p for p in found if digests.get(p, recorded) == recorded)


class UnreadableCheckpoint(ConfigError):
  def __init__(self, step: int, file: str, reason: str):
    super().__init__(f"checkpoint at step {step} is unreadable ({file}: {reason})")
    self.step = step


class RestoreFailed(ConfigError):
  """A readable checkpoint that this machine could not take in: out of memory, a device error, storage
  that did not answer or refused access. Nothing is moved: the same checkpoint serves a rerun."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint at step {step} could not be restored here ({reason}); it was left in place: "
                     f"rerun where there is the memory and access it needs")
    self.step = step


# Statuses (XLA's, tensorstore's) of a failure of the machine or the storage service, not of the files.
ENVIRONMENT_STATUSES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "PERMISSION_DENIED", "UNAUTHENTICATED")


def environment_error(e: Exception) -> bool:
  return (isinstance(e, (MemoryError, PermissionError, jax.errors.JaxRuntimeError))
          or any(status in str(e) for status in ENVIRONMENT_STATUSES))


def quiet_orphaned_reads() -> None:
  """For restores that fail: orbax gathers its array reads without cancelling the rest when one fails,
  and those end later, each printing a traceback: as an unraisable exception on tensorstore's threads
  (their event loop is closed, or their coroutine never finished), or through asyncio's log (a task's
  exception never retrieved). The failure itself is reported once, as one line; every other
  unraisable exception and asyncio error still prints."""
  previous = sys.unraisablehook
  if getattr(previous, "orphans_quiet", False):
    return

  def hook(unraisable: Any) -> None:
    closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    if not (closed or "_read_array_index_and_device_put" in repr(unraisable.object)):
      previous(unraisable)

  def orbax_read(record: logging.LogRecord) -> bool:
    error = str(record.exc_info[1]) if record.exc_info else ""  # orbax's, or tensorstore's own read error
    read = "while reading array index" in error or "in OCDBT database" in error
    return not ("exception was never retrieved" in record.getMessage() and read)

  hook.orphans_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(orbax_read)


def _locate(message: str, step_dir: Path) -> str:
  """The file a restore error is about: tensorstore names the item's directory and the array's key in it."""
  paths = re.findall(r"'path': '([^']*)'", message)
  folders = [p for p in paths if p.startswith(str(step_dir))]
  keys = [p for p in paths if not p.startswith("/")]
  if folders:
    return folders[0].rstrip("/") + ("/" + keys[-1].rstrip("/") if keys else "")
  match = re.search(re.escape(str(step_dir)) + r"[^\s'\",]*", message)
  return match.group(0) if match else str(step_dir)


def _tuples(tree: Any, slices: bool = False) -> Any:
  """JSON lists back to tuples inside grain's packing remainder slices (other states, such as the
  multiprocess prefetch's, keep lists)."""
  if isinstance(tree, dict):
    return {k: _tuples(v, slices or k == "remainder_slices") for k, v in tree.items()}
  if isinstance(tree, list):
    items = [_tuples(v, slices) for v in tree]
    return tuple(items) if slices else items
  return tree


class _DataPosition:
  """Adapts a grain iterator to grain's orbax handler (which takes bytes from other iterators).
  The position is taken when the save is asked for, since the asynchronous save writes it later while
  training moves on; and JSON lists of its packing slices are turned back into tuples on restore, because grain's packing
  compares them with a tuple and takes [-1, -1] for an unfinished document."""

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return self.saved

  def freeze(self) -> "_DataPosition":
    self.saved = json.dumps(self.iterator.get_state(), indent=2).encode()
    return self

  def set_state(self, state: bytes) -> None:
    position = _tuples(json.loads(state))  # a torn file raises here: an unreadable checkpoint
    try:
      self.iterator.set_state(position)
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a readable checkpoint: not one to set aside
      raise ConfigError(f"the checkpoint's data position ({type(e).__name__}: {e}) is not one this input pipeline "
                        f"reads: it was saved by another version of lm; resume with that version, or keep only "
                        f"the parameters with --init-from in a new --workdir") from None

  def start_prefetch(self) -> None:
    self.iterator.start_prefetch()


# Host (numpy) arrays are saved without orbax's defensive copy: only conversion saves them, and it
# waits for the save, so the copy would just double its host memory. Parameters are saved without
# compression for the same reason: zstd shrinks float32 weights by about a tenth, but tensorstore keeps
# every compressed chunk until the save commits, a second copy of the model. (The optimizer's moments,
# all zeros in a converted run, compress to nothing.)
_ARRAY_TYPES = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    (np.number, ocp.type_handlers.ScalarHandler()))


def _arrays_restore(target: Any) -> ocp.args.PyTreeRestore:
  """Into `target`'s shapes, dtypes and shardings (numpy arrays for numpy targets)."""
  return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _handlers() -> dict[str, Any]:
  return {"params": ocp.PyTreeCheckpointHandler(type_handler_registry=_ARRAY_TYPES, use_compression=False),
          "optimizer": ocp.PyTreeCheckpointHandler(type_handler_registry=_ARRAY_TYPES),
          "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpoints:
  def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None, read_only: bool = False):
    cfg = cfg or CheckpointConfig()
    self.dir = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else cfg.keep or None, keep_period=cfg.keep_every or None,
        save_interval_steps=0 if read_only else 1, create=not read_only,
        read_only=read_only, enable_async_checkpointing=True, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.dir, options=options, item_handlers=_handlers())
    # Restores skip orbax's barrier across processes: a process that cannot read its part would never
    # reach it and the others would wait there for ever. The caller agrees on the outcome instead.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    self.reader = ocp.CheckpointManager(self.dir, item_handlers=_handlers(), options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, cleanup_tmp_directories=False, multiprocessing_options=alone))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save; the previous one is finished first."""
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(state.params),
        optimizer=ocp.args.PyTreeSave({"step": state.step, "opt_state": state.opt_state}),
        data=grain.checkpoint.CheckpointSave(_DataPosition(data_iter).freeze()),
        meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=True)

  def meta(self, step: int) -> dict[str, Any]:
    return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """The full training state, placed with `abstract_state`'s shardings; moves `data_iter` to the
    saved position."""
    out = self._restore(
        step,
        params=_arrays_restore(abstract_state.params),
        optimizer=_arrays_restore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
        data=grain.checkpoint.CheckpointRestore(_DataPosition(data_iter)))
    return abstract_state.replace(params=out["params"], step=out["optimizer"]["step"],
                                  opt_state=out["optimizer"]["opt_state"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    return self._restore(step, params=_arrays_restore(abstract_params))["params"]

  def _restore(self, step: int, **items: Any) -> dict[str, Any]:
    quiet_orphaned_reads()  # before: a failed read's orphans may end before the error reaches us
    try:
      return self.reader.restore(step, args=ocp.args.Composite(**items))
    except ConfigError:
      raise
    except Exception as e:  # orbax and tensorstore raise many kinds: a file's fault, or the machine's
      reason = " ".join(str(e).split("See full TensorStore details")[0].split())[:200]
      if environment_error(e):
        raise RestoreFailed(step, reason) from None
      raise UnreadableCheckpoint(step, _locate(str(e), self.dir / str(step)), reason) from None

  def set_aside(self, step: int) -> Path | None:
    """Moves an unreadable checkpoint out of the manager's way; it is never deleted. Called by every
    process; process 0 moves it and says where."""
    target = None
    if jax.process_index() == 0:
      target = self.dir.parent / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
      target.parent.mkdir(exist_ok=True)
      shutil.move(str(self.dir / str(step)), target)
    multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()
    self.reader.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    # orbax's close does not wait for the cleanup of temporary directories that the manager starts
    # when it opens; a process that ends soon after (a config error) would print that thread's traceback.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self.reader.close()
    self.manager.close()


def run_step(spec: str) -> tuple[Path, int | None]:
  """`WORKDIR[:STEP]`, as --init-from and --draft name a run's checkpoint."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit():
    return Path(path), int(step)
  return Path(spec), None


def require_checkpoints(workdir: Path) -> None:
  """One line where `workdir` has no checkpoints at all (a run that never saved, or not a run)."""
  if not (workdir / "checkpoints").is_dir():
    raise ConfigError(f"work directory '{workdir}' has no checkpoints/; train there first")


def open_run(workdir: str | Path, step: int | None = None) -> tuple[Checkpoints, int, dict[str, Any]]:
  """A run's checkpoints (read-only), the newest or the given step, and that step's description."""
  workdir = Path(workdir)
  distributed.all_or_none(require_checkpoints, workdir)
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  steps = distributed.from_first(ckpts.steps())  # one listing: hosts that listed apart would mix two steps' weights
  if not steps or (step is not None and step not in steps):
    ckpts.close()
    wanted = "no complete checkpoint" if step is None else f"no checkpoint at step {step}"
    raise ConfigError(f"work directory '{workdir}' has {wanted}; available: {steps}")
  step = steps[-1] if step is None else step
  return ckpts, step, ckpts.meta(step)
