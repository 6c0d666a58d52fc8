"""The sampler's key/value cache entries: [B, kv_heads, S, head_dim] arrays in the compute dtype, or
(`--kv-cache int8`) int8 values with one scale per token and head, rounded by qwix as the int8 weights
are (lm.quantize). Attention applies the scales to its scores and probabilities (`lm.model.attend_heads_first`),
so the step reads the int8 values and no float copy of the cache is made."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import Mesh

from lm import sharding
from lm.config import ConfigError

MODES = ("int8",)


class Int8KV(NamedTuple):
  values_BxKxSxH: jax.Array  # int8
  # Apart from the values, not a trailing axis of 1: TPU memory tiles would pad that to 128 lanes.
  scales_BxKxS: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values_BxKxSxH.shape


Entry = jax.Array | Int8KV


def check(mode: str | None) -> None:
  if mode is not None and mode not in MODES:
    raise ConfigError(f"--kv-cache '{mode}' is not one of: {', '.join(MODES)}")


def entry_sharding(mode: str | None, mesh: Mesh, rules: dict[str, list[str]]) -> Any:
  values = sharding.named(mesh, ("batch", "kv_heads", None, None), rules)
  return Int8KV(values, sharding.named(mesh, ("batch", "kv_heads", None), rules)) if mode else values


def abstract_entry(mode: str | None, shape_BxKxSxH: tuple[int, ...], dtype: jnp.dtype, shardings: Any) -> Any:
  if mode:
    return Int8KV(jax.ShapeDtypeStruct(shape_BxKxSxH, jnp.int8, sharding=shardings.values_BxKxSxH),
                  jax.ShapeDtypeStruct(shape_BxKxSxH[:3], dtype, sharding=shardings.scales_BxKxS))
  return jax.ShapeDtypeStruct(shape_BxKxSxH, dtype, sharding=shardings)


def write(entry: Entry, index: tuple, new: jax.Array) -> Entry:
  """`entry.at[index].set(new)` (out-of-range rows dropped), `new` laid out as the indexed slots
  (head_dim last), rounded to int8 per token and head for an int8 entry."""
  if isinstance(entry, Int8KV):
    q = qwix.quantize(new, jnp.int8, channelwise_axes=tuple(range(new.ndim - 1)), scale_dtype=entry.scales_BxKxS.dtype)
    return Int8KV(entry.values_BxKxSxH.at[index].set(q.qvalue, mode="drop"),
                  entry.scales_BxKxS.at[index].set(q.scale[..., 0], mode="drop"))
  return entry.at[index].set(new.astype(entry.dtype), mode="drop")


def write_rows(entry: Entry, positions_BxT: jax.Array, new_BxTxKxH: jax.Array) -> Entry:
  """Row b's T new keys (or values) at its positions `positions_BxT[b]`: a scatter whose rows are a batch
  dimension, so a mesh that splits the rows writes each shard's own without gathering the others'."""
  return jax.vmap(lambda e, p_T, n_TxKxH: write(e, (slice(None), p_T), n_TxKxH.swapaxes(0, 1)))(entry, positions_BxT, new_BxTxKxH)


def first(entry: Entry, W: int) -> Entry:
  """The first W slots."""
  return jax.tree.map(lambda a: a[:, :, :W], entry)


def parts(entry: Entry, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array | None]:
  """The values in `dtype` (int8 ones converted as the matmul reads them), and the scales if any."""
  if isinstance(entry, Int8KV):
    return entry.values_BxKxSxH.astype(dtype), entry.scales_BxKxS
  return entry.astype(dtype), None
