"""Device mesh and logical-axis sharding rules."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lm.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int, where: str = "") -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} cannot fill {num_devices} devices{where}: {num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, but {num_devices} are available{where}")
  return tuple(sizes)


def check_rules(rules: dict[str, list[str]]) -> None:
  for name, axes in rules.items():
    if unknown := [a for a in axes if a not in AXES]:
      raise ConfigError(f"mesh.rules.{name} names mesh axis '{unknown[0]}'; mesh axes: {', '.join(AXES)}")
    if twice := sorted({a for a in axes if axes.count(a) > 1}):
      raise ConfigError(f"mesh.rules.{name}={axes} names mesh axis '{twice[0]}' twice; an array splits over an axis once")


def slices_of(devices: Sequence[jax.Device]) -> int:
  """How many slices (TPU pod slices joined over the data-center network) the devices come from."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def slice_count(cfg: MeshConfig, devices: Sequence[jax.Device]) -> int:
  """`slices_of` the devices, which `mesh.slices` (0: any) must agree with."""
  count = slices_of(devices)
  if cfg.slices not in (0, count):
    raise ConfigError(f"mesh.slices={cfg.slices}, but the {len(devices)} devices come from {count} slice(s); set it to {count} or 0")
  return count


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  check_rules(cfg.rules)
  devices = list(devices if devices is not None else jax.devices())
  auto = (AxisType.Auto,) * len(AXES)  # shardings propagate through XLA; we pin the important ones
  slices = slice_count(cfg, devices)
  if slices > 1:
    # as MaxText does: the mesh within each slice over its torus, the slices stacked along `data`
    shape = mesh_shape(cfg, len(devices) // slices, f" in each of {slices} slices")
    grid = mesh_utils.create_hybrid_device_mesh(shape, (slices, 1, 1), devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=auto)
  shape = mesh_shape(cfg, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def spec(logical: Sequence[str | None], rules: dict[str, list[str]]) -> P:
  """Maps logical axis names to mesh axes; a mesh axis is used at most once per array."""
  used, out = set(), []
  for name in logical:
    axes = tuple(a for a in rules.get(name, []) if a not in used) if name else ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def named(mesh: Mesh, logical: Sequence[str | None], rules: dict[str, list[str]]) -> NamedSharding:
  return NamedSharding(mesh, spec(logical, rules))


def data_parallel_size(mesh: Mesh, rules: dict[str, list[str]]) -> int:
  return math.prod(mesh.shape[a] for a in rules.get("batch", []))


def check_batch(batch_size: int, mesh: Mesh, rules: dict[str, list[str]], what: str = "train.batch_size") -> None:
  dp = data_parallel_size(mesh, rules)
  if batch_size % dp:
    raise ConfigError(f"{what}={batch_size} is not divisible by the data-parallel size {dp} (mesh {dict(mesh.shape)})")
  if batch_size % jax.process_count():
    raise ConfigError(f"{what}={batch_size} is not divisible by the process count {jax.process_count()}")


def _row_spans(batch_sharding: NamedSharding, global_batch: int) -> dict[int, set[tuple[int, int]]]:
  """Per process, the [start, stop) spans of the global batch its devices hold."""
  spans: dict[int, set[tuple[int, int]]] = {}
  for device, idx in batch_sharding.devices_indices_map((global_batch, 1)).items():
    spans.setdefault(device.process_index, set()).add(idx[0].indices(global_batch)[:2])
  return spans


def local_rows(batch_sharding: NamedSharding, global_batch: int) -> range:
  """The rows of a global batch that this process's devices hold; they must be contiguous."""
  spans = _row_spans(batch_sharding, global_batch)[jax.process_index()]
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ConfigError(f"process {jax.process_index()} holds rows {sorted(spans)} of the batch, not one contiguous block; reorder mesh axes so the batch axes lead")
  return range(start, stop)


def process_rows(batch_sharding: NamedSharding, global_batch: int) -> dict[str, list[int]]:
  """Every process's rows of a global batch, [start, stop) (keys are JSON's: strings)."""
  return {str(p): [min(a for a, _ in s), max(b for _, b in s)] for p, s in sorted(_row_spans(batch_sharding, global_batch).items())}


_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: dict[str, list[str]]):
  """While tracing under this context, `constrain` pins activations to the mesh."""
  token = _ACTIVATION_RULES.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def current() -> tuple[Mesh, dict[str, list[str]]] | None:
  return _ACTIVATION_RULES.get()


def platform() -> str:
  """What the traced computation will run on: the mesh's devices (TPUs when compiling ahead of time
  on a CPU), else the default backend."""
  ctx = _ACTIVATION_RULES.get()
  return ctx[0].devices.flat[0].platform if ctx else jax.default_backend()


def shards(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
  """How many pieces one PartitionSpec entry cuts an axis into."""
  names = () if entry is None else (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  ctx = _ACTIVATION_RULES.get()
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, named(ctx[0], logical, ctx[1]))
