"""Resume policy: which settings may change when a run continues, and where its starting state comes from
(its own newest readable checkpoint, or another run's parameters with --init-from)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from lm import config
from lm.checkpoint import Checkpoints, UnreadableCheckpoint, open_run
from lm.config import Config, ConfigError

# Settings that may change when a run resumes: schedule, cadences, precision, remat, the attention
# kernel and the mesh.
SAFE_CHANGES = ("train.steps", "train.learning_rate", "train.warmup_steps", "train.min_lr_ratio",
                "train.weight_decay", "train.b1", "train.b2", "train.clip_norm", "train.z_loss",
                "train.grad_accum", "model.dtype", "model.remat", "model.attention", "eval.", "checkpoint.", "log.", "mesh.")


def config_changes(saved: dict[str, Any], cfg: Config, keys: tuple[str, ...] | None = None) -> list[str]:
  """`key: old -> new` for every setting that differs (only those starting with `keys`, if given)."""
  old, new = config.flatten(saved), config.flatten(config.to_dict(cfg))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and (keys is None or k.startswith(keys))]


def model_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
  return [c for c in config_changes(saved, cfg, ("model.",)) if not c.startswith(SAFE_CHANGES)]


def parse_init_from(spec: str) -> tuple[Path, int | None]:
  """`OTHER_WORKDIR[:STEP]`."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit():
    return Path(path), int(step)
  return Path(spec), None


def init_from_run(spec: str) -> tuple[Checkpoints, int, dict[str, Any]]:
  """The other run's checkpoints, the chosen step and its description."""
  try:
    return open_run(*parse_init_from(spec))
  except ConfigError as e:
    raise ConfigError(f"--init-from {spec}: {e}") from None


def check_resumable(saved: dict[str, Any], cfg: Config, meta: dict[str, Any], workdir: Path, step: int) -> None:
  """Fails, before anything is loaded, where the checkpoint cannot continue under this config."""
  where = f"cannot resume {workdir} from step {step}"
  if unsafe := [c for c in config_changes(saved["config"], cfg) if not c.startswith(SAFE_CHANGES)]:
    raise ConfigError(f"{where}: {'; '.join(unsafe)} differ from its checkpoint; use a new --workdir (or --init-from {workdir})")
  if saved["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
    raise ConfigError(f"{where}: tokenizer {meta['tokenizer']['path']} is not the one it was trained with ({saved['tokenizer']['path']})")
  if saved["process_count"] != meta["process_count"]:
    raise ConfigError(f"{where}: it was saved by {saved['process_count']} processes, this run has {meta['process_count']}")


def restore_newest(ckpts: Checkpoints, cfg: Config, meta: dict[str, Any], workdir: Path, abstract_state: Any,
                   data_iter: Any, say: Callable[[str], None]) -> Any | None:
  """The state of the newest readable checkpoint (and the data position it saved), or None where there is
  none; unreadable checkpoints are set aside on the way."""
  for step in reversed(ckpts.steps()):
    try:
      saved = ckpts.meta(step)
      check_resumable(saved, cfg, meta, workdir, step)
      state = ckpts.restore(step, abstract_state, data_iter)
    except UnreadableCheckpoint as e:
      moved = ckpts.set_aside(step) if jax.process_index() == 0 else None
      multihost_utils.sync_global_devices("unreadable checkpoint set aside")
      say(f"{e}; moved it to {moved}; trying the previous checkpoint")
      continue
    if changes := config_changes(saved["config"], cfg):
      say(f"resuming with changed settings: {'; '.join(changes)}")
    say(f"resumed from step {step}")
    return state
  return None
