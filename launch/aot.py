"""Compile the real training step for a TPU topology ahead of time, with no TPU present:
python -m launch.aot --config CONFIG --topology v5e-16 [--slices N] [--sample ROWS,PROMPT,NEW [--quantize int8] [--kv-cache int8]] [--fit] [key=value ...]

Prints, per chip, the memory XLA's analysis gives (parameters, optimizer state, activations and
temporaries), whether it fits the chip's HBM, XLA's FLOP count and estimated step time, and the
MFU they imply (both count the layer scan's body once, so no tokens/s is derived from them). With --sample it also compiles the sampler (prefill,
then the loop of decode steps) for ROWS prompts of PROMPT tokens and NEW new tokens each, and prints
its memory per chip (with --quantize int8, for int8 weights as `lm-sample --quantize int8` computes them;
with --kv-cache int8, for an int8 key/value cache). Exits 1 when either does not fit; a training step that does not fit is one line,
what it needs per chip against what the chip has. --fit searches the largest train.batch_size that
fits with the configured model.remat, then the cheapest remat that fits it, and prints them as the overrides to use.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from lm import config
from lm.config import ConfigError

GIB = 1 << 30
# family: (HBM bytes per chip, TensorCores per chip as named in "v5p-8", torus dims); peak FLOP/s
# come from lm.flops.PEAK_FLOPS["TPU " + family].
CHIPS = {
    "v4": (32 * GIB, 2, 3),
    "v5e": (16 * GIB, 1, 2),
    "v5p": (95 * GIB, 2, 3),
    "v6e": (32 * GIB, 1, 2),
}


class DoesNotFit(ConfigError):
  """The training step needs more memory per chip than the chip has: `total` bytes, where XLA names them."""

  def __init__(self, message: str, total: float | None = None):
    super().__init__(message)
    self.total = total


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
  parser.add_argument("--fit", action="store_true", help="search the largest train.batch_size and cheapest model.remat that fit")
  parser.add_argument("--quantize", metavar="int8", help="the sampler's weights: weight-only int8")
  parser.add_argument("--kv-cache", metavar="int8", help="the sampler's key/value cache: int8")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_intermixed_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several may run at once
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print("error: launch.aot needs libtpu: pip install -e '.[tpu]'", file=sys.stderr)
    return 1
  from lm import kv_cache  # after JAX_PLATFORMS is set
  from lm.quantize import check as check_quantize

  try:
    cfg = config.load(args.config, args.overrides)
    if args.slices < 1:
      raise ConfigError(f"--slices={args.slices} must be at least 1")
    family, dims = topology_shape(args.topology)
    # what libtpu would otherwise look up in the TPU VM's metadata, warning on stderr when it cannot
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", args.topology)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    sample = sample_shape(args.sample) if args.sample else None
    for flag, value in (("--quantize", args.quantize), ("--kv-cache", args.kv_cache)):
      if value and not sample:
        raise ConfigError(f"{flag} applies to the sampler: add --sample ROWS,PROMPT,NEW")
    check_quantize(args.quantize)
    kv_cache.check(args.kv_cache)
    if cfg.model.vocab_size == 0:
      raise ConfigError("model.vocab_size is 0; set it (the tokenizer is not loaded here)")
    mesh = topology_mesh(cfg, family, dims, args.slices)
    try:
      reports = [fit_batch(cfg, mesh, family, args.slices) if args.fit else compile_step(cfg, mesh, family, args.slices)]
    except DoesNotFit as e:
      if not sample:
        raise
      print(f"error: {e}", file=sys.stderr)  # the sampler's table is still wanted: it does not depend on the batch
      reports = [{"rows": [], "fits": False}]
    if sample:
      reports.append(sampler_report(cfg, args, family, dims, sample))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for report in reports:
    for label, value in report["rows"]:
      print(f"{label:<34} {value}")
  return 0 if all(r["fits"] for r in reports) else 1


# model.remat policies, the most recomputed in the backward pass (and the least memory kept) first
REMAT_BY_MEMORY = ("full", "save_matmuls", "none")


def fit_batch(cfg: config.Config, mesh, family: str, slices: int) -> dict:
  """The report of the largest batch, in steps of the data-parallel size, whose training step fits
  with the configured remat, with what one step more needs; then of the cheapest remat policy (the
  one recomputing least) that fits that batch."""
  from lm import sharding

  unit = sharding.data_parallel_size(mesh, cfg.mesh.rules) * cfg.train.grad_accum
  tried: dict[int, dict | DoesNotFit] = {}

  def attempt(k: int) -> tuple[float, bool]:
    try:
      tried[k] = compile_step(with_settings(cfg, k * unit, cfg.model.remat), mesh, family, slices)
      total, fits = tried[k]["total"], True
    except DoesNotFit as e:
      tried[k] = e
      total, fits = e.total or math.inf, False
    # each compile of a large model takes minutes: say where the search is
    print(f"train.batch_size={k * unit} fits in {size(total)} per chip" if fits else tried[k], file=sys.stderr,
          flush=True)
    return total, fits

  k = largest_fitting(attempt, CHIPS[family][0])
  if k == 0:
    raise tried[1]
  batch, report, remat, cheaper = k * unit, tried[k], cfg.model.remat, []
  # each policy keeps more than the one before, so the first that does not fit ends the search
  for policy in REMAT_BY_MEMORY[REMAT_BY_MEMORY.index(remat) + 1:]:
    try:
      report, remat = compile_step(with_settings(cfg, batch, policy), mesh, family, slices), policy
    except DoesNotFit as e:
      cheaper.append(f"model.remat={policy}: {e}")
      print(cheaper[-1], file=sys.stderr, flush=True)
      break
  report["rows"] += [("largest batch that fits",
                      f"{batch} (searched in steps of {unit}, remat {cfg.model.remat}, {len(tried)} compiles); "
                      f"{tried[k + 1]}"),
                     *[("cheaper remat", line) for line in cheaper],
                     ("overrides to use", f"train.batch_size={batch} model.remat={remat}")]
  return report


def with_settings(cfg: config.Config, batch: int, remat: str) -> config.Config:
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch),
                             model=dataclasses.replace(cfg.model, remat=remat))


def largest_fitting(attempt: Callable[[int], tuple[float, bool]], limit: float) -> int:
  """The largest k >= 1 whose attempt fits, seen beside k + 1 not fitting (0 when 1 does not fit).
  An attempt gives memory per chip, close to affine in k, so the line through the last two attempts
  predicts k (the secant method); the guess is kept strictly between the largest k known to fit and
  the smallest known not to, so every attempt narrows the search. It starts at 1 and 2: small
  batches compile fastest, while XLA can spend far longer on one far beyond the chip's memory."""
  known = {}
  k = 1
  while True:
    known[k] = attempt(k)
    lo = max((j for j, (_, fits) in known.items() if fits), default=0)
    hi = min((j for j, (_, fits) in known.items() if not fits), default=math.inf)
    if hi == lo + 1:
      return lo
    guess = (lo + hi) / 2 if hi < math.inf else 2 * lo
    if len(known) > 1:
      (a, (at_a, _)), (b, (at_b, _)) = list(known.items())[-2:]
      slope = (at_b - at_a) / (b - a)
      if 0 < slope < math.inf:
        guess = a + (limit - at_a) / slope
    k = min(max(math.floor(guess), lo + 1), hi - 1)


def sample_shape(text: str) -> tuple[int, int, int]:
  match = re.fullmatch(r"(\d+),(\d+),(\d+)", text)
  if not match or 0 in (sizes := tuple(map(int, match.groups()))):
    raise ConfigError(f"--sample '{text}' is not ROWS,PROMPT,NEW with three positive numbers (for example 16,1024,1024)")
  return sizes


def sampler_report(cfg: config.Config, args: argparse.Namespace, family: str, dims: tuple[int, ...], sample: tuple[int, int, int]
                   ) -> dict[str, Any]:
  """The sampler's table; a decode mesh that the mesh.* overrides leave impossible is a row of it, after
  the training table."""
  from lm.sampler import sampling_config

  sample_cfg = sampling_config(cfg, math.prod(dims), [o for o in args.overrides if o.startswith("mesh.")])
  try:
    mesh = topology_mesh(sample_cfg, family, dims, args.slices)
  except ConfigError as e:
    return {"rows": [("decode mesh", f"none: {e}")], "fits": False}
  return compile_sampler(sample_cfg, mesh, family, *sample, args.quantize, args.kv_cache)


def topology_mesh(cfg: config.Config, family: str, dims: tuple[int, ...], slices: int):
  from jax.experimental import topologies

  from lm import sharding

  # v4 runs its chip's two TensorCores as one device (megacore), as v5p does by default.
  topology = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{family}:{'x'.join(map(str, dims))}",
      chip_config_name="megacore" if family == "v4" else "default",
      chips_per_host_bounds=(min(dims[0], 2), min(dims[1], 2), 1), num_slices=slices)
  return sharding.make_mesh(cfg.mesh, list(topology.devices))


def memory_rows(compiled, hbm: int) -> tuple[list[tuple[str, str]], bool, int]:
  """XLA's arguments, temporaries and total per chip, whether the total fits, and the total."""
  memory = compiled.memory_analysis()
  total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  fits = total <= hbm
  return [("arguments per chip (XLA)", size(memory.argument_size_in_bytes)),
          ("temporaries per chip (XLA)", size(memory.temp_size_in_bytes)),
          ("total per chip", f"{size(total)} of {size(hbm)} HBM: {'fits' if fits else 'DOES NOT FIT'}")], fits, total


def count(x: float, large: str, small: str, unit: float = 1e9) -> str:
  """In `unit`s (B, TFLOP) from a tenth of one, else in thousandths of them (M, GFLOP): a tiny model's are not 0.00."""
  return f"{x / unit:.2f}{large}" if x >= unit / 10 else f"{x / unit * 1e3:.2f}{small}"


def size(x: float) -> str:
  return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def per_chip(tree) -> int:
  import jax
  import numpy as np

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def needs(batch: int, total: float, hbm: int, family: str) -> str:
  return f"train.batch_size={batch} needs {size(total)} per chip, a {family} chip has {size(hbm)}"


def compile_within(lowered, arguments: int, hbm: int, family: str, batch: int):
  """Compiles, turning XLA's out-of-memory error into DoesNotFit. XLA names either the total
  ("Used X of Y hbm") or the temporaries alone, to which the arguments are then added."""
  import jax

  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    scale = lambda number, unit: float(number) * (1 << 10 * "BKMGT".index(unit or "B"))
    if used := re.search(r"Used ([\d.]+)([KMGT])?B? of", message):
      total = scale(*used.groups())
      raise DoesNotFit(needs(batch, total, hbm, family), total) from None
    if temps := re.search(r"HLO temporaries \(([\d.]+)([KMGT])?B?\)", message):
      total = scale(*temps.groups()) + arguments
      raise DoesNotFit(needs(batch, total, hbm, family), total) from None
    raise DoesNotFit(f"train.batch_size={batch} does not fit a {family} chip: {message.splitlines()[0]}") from None


def slice_rows(mesh) -> str:
  """Which `data` indices each slice's devices sit at: disjoint when only data parallelism crosses slices."""
  import numpy as np

  at = lambda i: sorted({int(d.slice_index) for d in np.asarray(mesh.devices)[i].flat})
  return "; ".join(f"data {i}: slice {at(i)}" for i in range(mesh.shape["data"]))


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
  compiled = compile_within(steps.train_step.lower(state, batch), per_chip((state, batch)), hbm, family, B)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory, fits, total = memory_rows(compiled, hbm)
  if not fits:
    raise DoesNotFit(needs(B, total, hbm, family), total)
  n = mesh.devices.size
  seconds = float(cost.get("optimal_seconds", float("nan")))
  xla_flops = float(cost.get("flops", float("nan")))
  model_flops = flops_per_token(cfg.model, L) * B * L / n
  rows = [
      ("topology", f"{family}-{n // slices * cores} x{slices}: {n} chips, mesh {dict(mesh.shape)}"),
      *([("data indices per slice", slice_rows(mesh))] if slices > 1 else []),
      ("model", f"{count(count_params(cfg.model), 'B', 'M')} parameters, {cfg.model.dtype} compute, remat {cfg.model.remat}"),
      ("batch", f"{B} x {L} tokens ({B * L // n} tokens per chip)"),
      attention_row(compiled),
      ("parameters per chip", size(per_chip(state.params))),
      ("optimizer state per chip", size(per_chip(state.opt_state))),
      *memory,
      # XLA's cost model counts a loop's body once, so its FLOPs and time cover one layer (of one
      # micro-batch, with train.grad_accum) plus the rest; the MFU below compares the two like with like.
      ("XLA FLOPs per chip per step", f"{count(xla_flops, ' TFLOP', ' GFLOP', 1e12)} (the layer scan's body counted once"
       + (f", and one of {cfg.train.grad_accum} micro-batches)" if cfg.train.grad_accum > 1 else ")")),
      ("model FLOPs per chip per step", f"{count(model_flops, ' TFLOP', ' GFLOP', 1e12)} (6 x parameters + attention, all layers)"),
      ("XLA estimated step time", f"{seconds:.4f} s (same counting)" if seconds > 0 else "n/a (XLA gave none)"),
      ("implied MFU", f"{100 * xla_flops / seconds / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s (XLA FLOPs / XLA time)"
       if seconds > 0 else "n/a"),
  ]
  return {"rows": rows, "fits": fits, "total": total}


COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-done)?\(")
ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
CALLEE = re.compile(r"\b(calls|body|to_apply|branch_computations)=\{?([%\w.\-, ]+)\}?")
TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def group_size(line: str, devices: int) -> int:
  """How many devices a collective's groups hold, in any of the forms XLA prints them (none or {}: all)."""
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
    sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
  if m := re.search(r"replica_groups=\[([\d,]+)\]<=", line):
    return int(m.group(1).split(",")[-1])
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(m.group(1).split(","))
  return devices


def traffic(kind: str, result_bytes: float, n: int) -> float:
  """Bytes a chip sends (as many as it receives) for a collective over n devices, done as a ring: an
  all-gather passes on the n-1 shards of its result it lacks, an all-reduce a reduce-scatter and an
  all-gather of its result, a reduce-scatter n-1 pieces the size of its result."""
  share = {"all-gather": (n - 1) / n, "all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1, "all-to-all": (n - 1) / n}
  return result_bytes * share.get(kind, 1.0)  # collective-permute: its whole result


def collectives(hlo: str, devices: int) -> list[tuple[str, tuple[int, ...], int, int, int]]:
  """Every collective a compiled module of `devices` devices runs, as (kind, result shape, bytes,
  times run, group size): ops inside a loop body count once per iteration of each loop around them; of
  a conditional's branches, which run one at a time (greedy or sampled tokens), the one moving the
  most bytes."""
  bodies: dict[str, list[str]] = {}
  name = None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = head.group(1)
      bodies[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None:
      bodies[name].append(line)
  moved = lambda ops: sum(traffic(kind, b, n) * t for kind, _, b, t, n in ops)
  # An async op is counted at its -done line, which names its -start: the groups are printed there.
  starts = {m.group(1): line for line in hlo.splitlines() if (m := re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*-start\(", line))}

  def walk(comp: str, times: int) -> list[tuple[str, tuple[int, ...], int, int, int]]:
    found = []
    for line in bodies.get(comp, []):
      op = COLLECTIVE.search(line)
      if op and not re.search(r"-start\(", line):
        for dtype, dims in ARRAY.findall(op.group(1)):
          shape = tuple(int(d) for d in dims.split(",") if d)
          itemsize = 1 if dtype == "pred" or dtype.startswith("f8") else int(re.sub(r"\D", "", dtype)) // 8
          start = re.search(r"-done\(.*?%([\w.\-]+)\)", line)
          found.append((op.group(2), shape, math.prod(shape) * itemsize, times,
                        group_size(starts.get(start.group(1), line) if start else line, devices)))
      trips = int(m.group(1)) if (m := TRIPS.search(line)) else loop_bound(bodies, line)
      for kind, callees in CALLEE.findall(line):
        called = [walk(c.strip(), times * (trips if kind == "body" else 1)) for c in callees.replace("%", "").split(",")]
        found += max(called, key=moved) if kind == "branch_computations" else [op for ops in called for op in ops]
    return found

  return walk(entry, 1)


def loop_bound(bodies: dict[str, list[str]], line: str) -> int:
  """A while loop's trip count where XLA recorded none (TPU): the constant its condition compares
  the counter with (a scan counts from 0 by 1; a decode chunk's loop that may end early counts at most that)."""
  cond = re.search(r"condition=%?([\w.\-]+)", line)
  bounds = [int(c) for text in bodies.get(cond.group(1), []) for c in re.findall(r"s32\[\]\S* constant\((\d+)\)", text)] if cond else []
  return max(bounds, default=1)


def is_weight(shape: tuple[int, ...], params) -> bool:
  """Whether an all-gather's result is (a layer's slice of) a weight matrix: each axis between the
  weight's shard and its whole size."""
  import jax

  shape = tuple(d for d in shape if d != 1)
  for x in jax.tree.leaves(params):
    for k in (0, 1) if len(x.shape) > 2 else (0,):
      whole, shard = x.shape[k:], x.sharding.shard_shape(x.shape)[k:]
      if len(whole) == len(shape) > 1 and all(s <= d <= w and w % d == 0 for d, s, w in zip(shape, shard, whole)):
        return True
  return False


def compile_sampler(cfg: config.Config, mesh, family: str, rows: int, prompt_len: int, new_tokens: int,
                    quantize: str | None = None, kv: str | None = None) -> dict:
  """The sampler's insert (prefill into slots) and decode chunk, with parameters sharded and cast as
  `lm-sample` restores them, on the mesh given by mesh.* overrides or else the decode mesh."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lm import sharding
  from lm.params import abstract_model, param_shardings
  from lm.sampler import Sampler, bucket, prefill_rows, prompt_bucket

  hbm = CHIPS[family][0]
  rules = cfg.mesh.rules
  if prompt_len + new_tokens > cfg.model.max_seq_len:
    raise ConfigError(f"--sample: {prompt_len} + {new_tokens} tokens exceed model.max_seq_len={cfg.model.max_seq_len}")
  sharding.check_batch(rows, mesh, rules, what="--sample ROWS")
  _, abstract = abstract_model(cfg.model)
  dtype = jnp.dtype(cfg.model.dtype)
  params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype, sharding=s), nnx.to_pure_dict(abstract),
                        param_shardings(abstract, mesh, rules))
  sampler = Sampler(cfg, params, None, mesh, quantize, kv)
  S = bucket(prompt_len + new_tokens, cfg.model.max_seq_len)
  chunk = cfg.sample.chunk
  heading = [("sampling", f"{rows} slots x {S} positions ({prompt_len} prompt + {new_tokens} new), decode chunk {chunk}"),
             ("decode mesh", f"{dict(mesh.shape)}, {quantize or cfg.model.dtype} weights, {kv or cfg.model.dtype} KV cache")]
  try:
    insert = sampler.insert_function(rows, S, prefill_rows(rows, sampler.rows_multiple), prompt_bucket(prompt_len - 1, S))
    decode = sampler.decode_function(rows, S, chunk)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"rows": [*heading, ("KV cache per chip", size(per_chip(sampler.abstract_state(rows, S)["cache"]))),
                     ("decode total per chip", f"more than {size(hbm)} HBM: DOES NOT FIT ({str(e).splitlines()[0]})")], "fits": False}
  cache_chip = per_chip(sampler.abstract_state(rows, S)["cache"])
  weights_chip = per_chip(sampler.params)
  found = collectives(decode.as_text(), mesh.size)
  moved = sum(traffic(kind, b, n) * t for kind, _, b, t, n in found)
  gathered = sum(traffic(kind, b, n) * t for kind, shape, b, t, n in found if kind == "all-gather" and is_weight(shape, params))
  tokens = rows * chunk
  memory, fits, _ = memory_rows(decode, hbm)
  cost = decode.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  seconds = float(cost.get("optimal_seconds", float("nan")))
  return {"rows": [
      *heading,
      attention_row(insert),
      ("parameters per chip", size(weights_chip)),
      ("KV cache per chip", size(cache_chip)),
      *[(f"decode {label}", value) for label, value in memory],
      # XLA counts the body of the loop of decode steps once (the sampler runs its layers one by one).
      ("decode XLA bytes accessed", f"{size(float(cost.get('bytes accessed', float('nan'))))} (the step loop's body counted once)"),
      ("decode XLA estimated time", f"{seconds * 1e6:.1f} us (same counting)" if seconds > 0 else "n/a (XLA gave none)"),
      ("interconnect per token per chip", f"{size(moved / tokens)} (sent by the collectives in the compiled decode, "
       f"as rings; loop bodies x trip counts, / {tokens} tokens)"),
      ("  of which weight all-gathers", size(gathered / tokens)),
      # The weights a chip gathers land in its HBM and are read there too.
      ("HBM read per token per chip", f"{size(((weights_chip + cache_chip) * chunk + gathered) / tokens)} "
       f"(its weights, those it gathers and the whole KV cache per step, / {rows} rows)"),
  ], "fits": fits, "collectives": found, "weight_gather_bytes": gathered}

if __name__ == "__main__":
  sys.exit(main())
