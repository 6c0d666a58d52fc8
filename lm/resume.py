"""Resume policy: which settings may change when a run continues, and where its starting state comes from
(its own newest readable checkpoint, or another run's parameters with --init-from)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm import config, distributed
from lm.checkpoint import Checkpoints, RestoreFailed, UnreadableCheckpoint, open_run, run_step
from lm.config import Config, ConfigError

# Settings that may change when a run resumes: schedule, cadences, precision, remat, the attention
# kernel, the mesh, profiling, sampling, and where the tokenizer lies (its SHA-256 is checked).
SAFE_CHANGES = ("tokenizer.path", "train.steps", "train.learning_rate", "train.warmup_steps", "train.min_lr_ratio",
                "train.weight_decay", "train.b1", "train.b2", "train.clip_norm", "train.z_loss",
                "train.grad_accum", "model.dtype", "model.remat", "model.attention", "eval.", "checkpoint.", "log.", "mesh.", "profile.", "sample.")


def config_changes(saved: dict[str, Any], cfg: Config, keys: tuple[str, ...] | None = None) -> list[str]:
  """`key: old -> new` for every setting that differs (only those starting with `keys`, if given)."""
  old, new = config.flatten(saved), config.flatten(config.to_dict(cfg))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and (keys is None or k.startswith(keys))]


def model_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
  return [c for c in config_changes(saved, cfg, ("model.",)) if not c.startswith(SAFE_CHANGES)]


def init_from_run(spec: str) -> tuple[Checkpoints, int, dict[str, Any]]:
  """The other run's checkpoints, the chosen step and its description."""
  try:
    return open_run(*run_step(spec))
  except ConfigError as e:
    raise ConfigError(f"--init-from {spec}: {e}") from None


def check_resumable(saved: dict[str, Any], cfg: Config, meta: dict[str, Any], workdir: Path, step: int) -> None:
  """Fails, before anything is loaded, where the checkpoint cannot continue under this config."""
  where = f"cannot resume {workdir} from step {step}"
  if unsafe := [c for c in config_changes(saved["config"], cfg) if not c.startswith(SAFE_CHANGES)]:
    raise ConfigError(f"{where}: {'; '.join(unsafe)} differ from its checkpoint; use a new --workdir (or --init-from {workdir})")
  if saved["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
    raise ConfigError(f"{where}: tokenizer {meta['tokenizer']['path']} is not the one it was trained with ({saved['tokenizer']['path']})")
  then, now = saved.get("documents", meta["documents"]), meta["documents"]
  if changed := "; ".join(f"{part} {then[part]} then, {now[part]} now" for part in then if then[part] != now[part]):
    raise ConfigError(f"{where}: its data sources hold other documents now (per source, documents or a single text's "
                      f"characters: {changed}), so neither the held-out split nor the data position would continue; "
                      f"restore the data it was trained on, or use a new --workdir (or --init-from {workdir})")
  if saved["process_count"] != meta["process_count"]:
    raise ConfigError(f"{where}: it was saved by {saved['process_count']} processes, this run has {meta['process_count']}")
  if moved := [f"process {p}: rows {a}-{b - 1} then, {meta['rows'][p][0]}-{meta['rows'][p][1] - 1} now"
               for p, (a, b) in saved.get("rows", meta["rows"]).items() if meta["rows"][p] != [a, b]]:
    # each process saved the position of its own rows' streams: another process's rows cannot take it up
    raise ConfigError(f"{where}: this mesh gives the processes other rows of each batch than its data positions are of "
                      f"({'; '.join(moved)}); resume with the mesh settings it was saved with")


def check_retention(saved_cfg: dict[str, Any], cfg: Config, steps: list[int], where: str) -> None:
  """Each save applies this run's retention to every checkpoint there: one kept for ever under the
  saved checkpoint.keep_every must stay kept under the new one."""
  old, new = saved_cfg["checkpoint"].get("keep_every", 0), cfg.checkpoint.keep_every
  if lost := [s for s in steps if old and s % old == 0 and not (new and s % new == 0)]:
    raise ConfigError(f"{where}: checkpoint.keep_every {old} -> {new} would delete steps {lost}, kept for ever until now; "
                      f"resume with checkpoint.keep_every={old} (or a divisor of it), or move them out of checkpoints/ first")


def check_init_from(spec: str, saved: dict[str, Any], cfg: Config, meta: dict[str, Any]) -> None:
  """Fails where the other run's parameters do not fit this model, or were trained with another tokenizer."""
  if changes := model_changes(saved["config"], cfg):
    raise ConfigError(f"--init-from {spec}: the model differs from that run's ({'; '.join(changes)})")
  if saved["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
    raise ConfigError(f"--init-from {spec}: tokenizer {meta['tokenizer']['path']} is not the one that run was trained "
                      f"with ({saved['tokenizer']['path']}); leave tokenizer.path empty to take that one")


def failed_processes(failed: bool) -> list[int]:
  """Which processes failed, the same list on every process."""
  if jax.process_count() == 1:
    return [0] if failed else []
  return np.flatnonzero(multihost_utils.process_allgather(np.int32(failed))).tolist()


def restore_newest(ckpts: Checkpoints, cfg: Config, meta: dict[str, Any], workdir: Path, abstract_state: Any,
                   data_iter: Any, say: Callable[[str], None]) -> Any | None:
  """The state of the newest checkpoint every process can read (and the data position it saved), or None
  where there is none; unreadable checkpoints are set aside on the way. All processes agree on each step,
  so one that cannot read its part of a checkpoint moves them all on to the previous one. One that lacks
  the memory or access to take it in stops them all, and moves nothing."""
  fresh = data_iter.get_state()
  steps = distributed.from_first(ckpts.steps())  # one listing: hosts that listed apart would mix two steps' weights
  for step in reversed(steps):
    error = failed_here = None
    try:
      saved = ckpts.meta(step)
      check_resumable(saved, cfg, meta, workdir, step)
      check_retention(saved["config"], cfg, steps, f"cannot resume {workdir} from step {step}")
      state = ckpts.restore(step, abstract_state, data_iter)
    except UnreadableCheckpoint as e:
      error = e
    except RestoreFailed as e:
      failed_here = e
    # Out of memory or access anywhere: every process stops and the checkpoint stays for a rerun.
    if failed := failed_processes(failed_here is not None):
      raise failed_here or RestoreFailed(step, f"process(es) {failed} could not take it in")
    if failed := failed_processes(error is not None):
      moved = ckpts.set_aside(step)
      why = str(error or f"checkpoint at step {step} is unreadable")
      why += f" on process(es) {failed}" if jax.process_count() > 1 else ""
      say(f"{why}; moved it to {moved}; trying the previous checkpoint")
      continue
    if changes := config_changes(saved["config"], cfg):
      say(f"resuming with changed settings: {'; '.join(changes)}")
    say(f"resumed from step {step}")
    return state
  data_iter.set_state(fresh)  # a process that read a checkpoint the others could not had moved it
  return None
