"""Compile the real training step for a TPU topology ahead of time, with no TPU present:
python -m launch.aot --config CONFIG --topology v5e-16 [--slices N] [--sample ROWS,PROMPT,NEW [--quantize int8]] [key=value ...]

Prints, per chip, the memory XLA's analysis gives (parameters, optimizer state, activations and
temporaries), whether it fits the chip's HBM, XLA's FLOP count and estimated step time, and the
tokens per second per chip and MFU they imply. With --sample it also compiles the sampler (prefill,
then the scan of decode steps) for ROWS prompts of PROMPT tokens and NEW new tokens each, and prints
its memory per chip (with --quantize int8, for int8 weights as `lm-sample --quantize int8` computes them).
Exits 1 when either does not fit.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from lm import config
from lm.config import ConfigError, head_dim

GIB = 1 << 30
# family: (HBM bytes per chip, TensorCores per chip as named in "v5p-8", torus dims); peak FLOP/s
# come from lm.flops.PEAK_FLOPS["TPU " + family].
CHIPS = {
    "v4": (32 * GIB, 2, 3),
    "v5e": (16 * GIB, 1, 2),
    "v5p": (95 * GIB, 2, 3),
    "v6e": (32 * GIB, 1, 2),
}


def topology_shape(name: str) -> tuple[str, tuple[int, ...]]:
  """`v5e-16` -> (family, torus shape)."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if not match:
    raise ConfigError(f"--topology '{name}' is not one of v4-N, v5e-N, v5p-N, v6e-N (for example v5e-16, v5p-8)")
  family, count = match.group(1), int(match.group(2))
  _, cores, ndim = CHIPS[family]
  chips = count // cores
  if chips < 1 or chips & (chips - 1) or count % cores:
    raise ConfigError(f"--topology '{name}': {family} slices come in powers of two of {'TensorCores' if cores > 1 else 'chips'}")
  dims = [1] * ndim
  for axis in [1, 0] * 16 if ndim == 2 else [0, 1, 2] + [2, 1, 0] * 16:  # v5p-64: 2x4x4, v5e-32: 4x8
    if math.prod(dims) >= chips:
      break
    dims[axis] *= 2
  return family, tuple(dims)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="aot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--topology", required=True, help="v4-N, v5e-N, v5p-N or v6e-N")
  parser.add_argument("--slices", type=int, default=1)
  parser.add_argument("--sample", metavar="ROWS,PROMPT,NEW", help="also compile the sampler for this batch")
  parser.add_argument("--quantize", metavar="int8", help="the sampler's weights: weight-only int8")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several may run at once
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print("error: launch.aot needs libtpu: pip install -e '.[tpu]'", file=sys.stderr)
    return 1
  from lm.quantize import check as check_quantize  # after JAX_PLATFORMS is set

  try:
    cfg = config.load(args.config, args.overrides)
    family, dims = topology_shape(args.topology)
    sample = sample_shape(args.sample) if args.sample else None
    if args.quantize and not sample:
      raise ConfigError("--quantize applies to the sampler: add --sample ROWS,PROMPT,NEW")
    check_quantize(args.quantize)
    if cfg.model.vocab_size == 0:
      raise ConfigError("model.vocab_size is 0; set it (the tokenizer is not loaded here)")
    mesh = topology_mesh(cfg, family, dims, args.slices)
    reports = [compile_step(cfg, mesh, family, args.slices)] + ([compile_sampler(cfg, mesh, family, *sample, args.quantize)] if sample else [])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for report in reports:
    for label, value in report["rows"]:
      print(f"{label:<34} {value}")
  return 0 if all(r["fits"] for r in reports) else 1


def sample_shape(text: str) -> tuple[int, int, int]:
  match = re.fullmatch(r"(\d+),(\d+),(\d+)", text)
  if not match or 0 in (sizes := tuple(map(int, match.groups()))):
    raise ConfigError(f"--sample '{text}' is not ROWS,PROMPT,NEW with three positive numbers (for example 16,1024,1024)")
  return sizes


def topology_mesh(cfg: config.Config, family: str, dims: tuple[int, ...], slices: int):
  from jax.experimental import topologies

  from lm import sharding

  topology = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{family}:{'x'.join(map(str, dims))}", chip_config_name="default",
      chips_per_host_bounds=(min(dims[0], 2), min(dims[1], 2), 1), num_slices=slices)
  return sharding.make_mesh(cfg.mesh, list(topology.devices))


def memory_rows(compiled, hbm: int) -> tuple[list[tuple[str, str]], bool]:
  """XLA's arguments, temporaries and total per chip, and whether the total fits."""
  memory = compiled.memory_analysis()
  total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  fits = total <= hbm
  return [("arguments per chip (XLA)", size(memory.argument_size_in_bytes)),
          ("temporaries per chip (XLA)", size(memory.temp_size_in_bytes)),
          ("total per chip", f"{size(total)} of {size(hbm)} HBM: {'fits' if fits else 'DOES NOT FIT'}")], fits


def size(x: float) -> str:
  return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def per_chip(tree) -> int:
  import jax
  import numpy as np

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def attention_row(compiled) -> tuple[str, str]:
  return ("attention", "splash kernel" if "tpu_custom_call" in compiled.as_text() else "xla (scores materialized)")


def compile_step(cfg: config.Config, mesh, family: str, slices: int) -> dict:
  import jax
  import jax.numpy as jnp

  from lm import sharding
  from lm.flops import PEAK_FLOPS, flops_per_token
  from lm.model import count_params
  from lm.train import Steps

  hbm, cores, _ = CHIPS[family]
  peak = PEAK_FLOPS[f"TPU {family}"]
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.mesh.rules)
  steps = Steps(cfg, mesh)
  B, L = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=steps.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  state = steps.abstract_state()
  compiled = steps.train_step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory, fits = memory_rows(compiled, hbm)
  n = mesh.devices.size
  seconds = float(cost.get("optimal_seconds", float("nan")))
  xla_flops = float(cost.get("flops", float("nan")))
  model_flops = flops_per_token(cfg.model, L) * B * L / n
  rows = [
      ("topology", f"{family}-{n // slices * cores} x{slices}: {n} chips, mesh {dict(mesh.shape)}"),
      ("model", f"{count_params(cfg.model) / 1e9:.2f}B parameters, {cfg.model.dtype} compute, remat {cfg.model.remat}"),
      ("batch", f"{B} x {L} tokens ({B * L // n} tokens per chip)"),
      attention_row(compiled),
      ("parameters per chip", size(per_chip(state.params))),
      ("optimizer state per chip", size(per_chip(state.opt_state))),
      *memory,
      # XLA's cost model counts the body of the layer scan once, so its FLOPs and time cover one
      # layer plus the rest; the MFU below compares the two like with like.
      ("XLA FLOPs per chip per step", f"{xla_flops / 1e12:.2f} TFLOP (the layer scan's body counted once)"),
      ("model FLOPs per chip per step", f"{model_flops / 1e12:.2f} TFLOP (6 x parameters + attention, all layers)"),
      ("XLA estimated step time", f"{seconds:.4f} s (same counting)" if seconds > 0 else "n/a (XLA gave none)"),
      ("implied tokens/s per chip", f"{B * L / n / seconds:,.0f} (same counting)" if seconds > 0 else "n/a"),
      ("implied MFU", f"{100 * xla_flops / seconds / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s (XLA FLOPs / XLA time)"
       if seconds > 0 else "n/a"),
  ]
  return {"rows": rows, "fits": fits}


def compile_sampler(cfg: config.Config, mesh, family: str, rows: int, prompt_len: int, new_tokens: int,
                    quantize: str | None = None) -> dict:
  """The sampler's prefill and decode scan, with parameters sharded as `lm-sample` restores them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lm import sharding
  from lm.params import abstract_model, param_shardings
  from lm.sampler import Sampler

  hbm = CHIPS[family][0]
  rules = cfg.mesh.rules
  if prompt_len + new_tokens > cfg.model.max_seq_len:
    raise ConfigError(f"--sample: {prompt_len} + {new_tokens} tokens exceed model.max_seq_len={cfg.model.max_seq_len}")
  sharding.check_batch(rows, mesh, rules, what="--sample ROWS")
  _, abstract = abstract_model(cfg.model)
  params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(abstract),
                        param_shardings(abstract, mesh, rules))
  per_row = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.named(mesh, ("batch",) + (None,) * (len(shape) - 1), rules))
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, P()))
  key_words = jax.random.key_data(jax.random.key(0)).shape[-1]
  sampler = Sampler(cfg, params, None, mesh, quantize)
  args = (sampler.params, per_row(rows, prompt_len), per_row(rows), per_row(rows, key_words, dtype=jnp.uint32),
          scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))
  prefill, decode = sampler.compiled_functions(rows, prompt_len, new_tokens, args)
  cache = 2 * cfg.model.num_layers * rows * (prompt_len + new_tokens) * cfg.model.num_kv_heads * head_dim(cfg.model)
  cache_shards = math.prod(sharding.shards(mesh, entry) for entry in sampler.cache_sharding.spec)
  memory, fits = memory_rows(decode, hbm)
  cost = decode.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  seconds = float(cost.get("optimal_seconds", float("nan")))
  return {"rows": [
      ("sampling", f"{rows} rows x ({prompt_len} prompt + {new_tokens} new) tokens"),
      attention_row(prefill),
      ("parameters per chip", size(per_chip(sampler.params)) + (f" ({quantize} weights)" if quantize else "")),
      ("KV cache per chip", size(cache * jnp.dtype(cfg.model.dtype).itemsize / cache_shards)),
      *[(f"decode {label}", value) for label, value in memory],
      # As for the step: XLA counts the bodies of the scans (decode steps, layers) once each.
      ("decode XLA bytes accessed", f"{size(float(cost.get('bytes accessed', float('nan'))))} (scan bodies counted once)"),
      ("decode XLA estimated time", f"{seconds * 1e6:.1f} us (same counting)" if seconds > 0 else "n/a (XLA gave none)"),
  ], "fits": fits}

if __name__ == "__main__":
  sys.exit(main())
