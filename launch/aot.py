"""Compile the real training step for a TPU topology ahead of time, with no TPU present:
python -m launch.aot --config CONFIG --topology v5e-16 [--slices N] [key=value ...]

Prints, per chip, the memory XLA's analysis gives (parameters, optimizer state, activations and
temporaries), whether it fits the chip's HBM, XLA's FLOP count and estimated step time, and the
tokens per second per chip and MFU they imply. Exits 1 when the step does not fit.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from lm import config
from lm.config import ConfigError

GIB = 1 << 30
# family: (dense bf16 FLOP/s per chip, HBM bytes per chip, TensorCores per chip as named in "v5p-8", torus dims)
CHIPS = {
    "v4": (275e12, 32 * GIB, 2, 3),
    "v5e": (197e12, 16 * GIB, 1, 2),
    "v5p": (459e12, 95 * GIB, 2, 3),
    "v6e": (918e12, 32 * GIB, 1, 2),
}


def topology_shape(name: str) -> tuple[str, int, tuple[int, ...]]:
  """`v5e-16` -> (family, chips, torus shape)."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if not match:
    raise ConfigError(f"--topology '{name}' is not one of v4-N, v5e-N, v5p-N, v6e-N (for example v5e-16, v5p-8)")
  family, count = match.group(1), int(match.group(2))
  _, _, cores, ndim = CHIPS[family]
  chips = count // cores
  if chips < 1 or chips & (chips - 1) or count % cores:
    raise ConfigError(f"--topology '{name}': {family} slices come in powers of two of {'TensorCores' if cores > 1 else 'chips'}")
  dims = [1] * ndim
  for axis in [1, 0] * 16 if ndim == 2 else [0, 1, 2] + [2, 1, 0] * 16:  # v5p-64: 2x4x4, v5e-32: 4x8
    if math.prod(dims) >= chips:
      break
    dims[axis] *= 2
  return family, chips, tuple(dims)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="aot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--topology", required=True, help="v4-N, v5e-N, v5p-N or v6e-N")
  parser.add_argument("--slices", type=int, default=1)
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several may run at once
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print("error: launch.aot needs libtpu: pip install -e '.[tpu]'", file=sys.stderr)
    return 1
  try:
    cfg = config.load(args.config, args.overrides)
    family, chips, dims = topology_shape(args.topology)
    if cfg.model.vocab_size == 0:
      raise ConfigError("model.vocab_size is 0; set it (the tokenizer is not loaded here)")
    report = compile_step(cfg, family, chips, dims, args.slices)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for label, value in report["rows"]:
    print(f"{label:<34} {value}")
  return 0 if report["fits"] else 1


def compile_step(cfg: config.Config, family: str, chips: int, dims: tuple[int, ...], slices: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies

  from lm import sharding
  from lm.flops import flops_per_token
  from lm.model import count_params
  from lm.train import Steps

  peak, hbm, _, _ = CHIPS[family]
  topology = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{family}:{'x'.join(map(str, dims))}", chip_config_name="default",
      chips_per_host_bounds=(min(dims[0], 2), min(dims[1], 2), 1), num_slices=slices)
  devices = list(topology.devices)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.mesh.rules)
  steps = Steps(cfg, mesh)
  B, L = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=steps.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  state = steps.abstract_state()
  compiled = steps.train_step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost

  def per_chip(tree) -> int:
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)

  total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  n = len(devices)
  seconds = float(cost.get("optimal_seconds", float("nan")))
  xla_flops = float(cost.get("flops", float("nan")))
  model_flops = flops_per_token(cfg.model, L) * B * L / n
  fits = total <= hbm
  gb = lambda x: f"{x / 1e9:.2f} GB"
  rows = [
      ("topology", f"{family}-{chips * CHIPS[family][2]} x{slices}: {n} chips, mesh {dict(mesh.shape)}"),
      ("model", f"{count_params(cfg.model) / 1e9:.2f}B parameters, {cfg.model.dtype} compute, remat {cfg.model.remat}"),
      ("batch", f"{B} x {L} tokens ({B * L // n} tokens per chip)"),
      ("parameters per chip", gb(per_chip(state.params))),
      ("optimizer state per chip", gb(per_chip(state.opt_state))),
      ("arguments per chip (XLA)", gb(memory.argument_size_in_bytes)),
      ("temporaries per chip (XLA)", gb(memory.temp_size_in_bytes)),
      ("total per chip", f"{gb(total)} of {gb(hbm)} HBM: {'fits' if fits else 'DOES NOT FIT'}"),
      # XLA's cost model counts the body of the layer scan once, so its FLOPs and time cover one
      # layer plus the rest; the MFU below compares the two like with like.
      ("XLA FLOPs per chip per step", f"{xla_flops / 1e12:.2f} TFLOP (the layer scan's body counted once)"),
      ("model FLOPs per chip per step", f"{model_flops / 1e12:.2f} TFLOP (6 x parameters + attention, all layers)"),
      ("XLA estimated step time", f"{seconds:.4f} s (same counting)" if seconds > 0 else "n/a (XLA gave none)"),
      ("implied tokens/s per chip", f"{B * L / n / seconds:,.0f} (same counting)" if seconds > 0 else "n/a"),
      ("implied MFU", f"{100 * xla_flops / seconds / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s (XLA FLOPs / XLA time)"
       if seconds > 0 else "n/a"),
  ]
  return {"rows": rows, "fits": fits, "total_bytes": total, "seconds": seconds}


if __name__ == "__main__":
  sys.exit(main())
