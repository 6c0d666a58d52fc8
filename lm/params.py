"""The model's parameters without the training step: their abstract shapes, logical axes and shardings."""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lm import sharding
from lm.config import ConfigError, ModelConfig
from lm.model import Transformer


def abstract_model(cfg: ModelConfig, stacked: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only state; the state's Params carry their logical axes."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), stacked)))


def unstack(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh, rules: dict[str, list[str]],
            consume: bool = False) -> dict[str, Any]:
  """Stacked parameters (a checkpoint's) as those of `Transformer(cfg, stacked=False)`, each layer's
  weights arrays of their own, split where they lie. Abstract params (shapes with shardings) give
  abstract ones. Listed ones (another sampler's) are returned as they are. `consume`: the caller
  hands `params` over, and each stacked weight leaves it once split, so the split never holds much
  more than one copy of the weights."""
  if all(isinstance(key, int) for key in params["blocks"]):
    return params
  _, abstract = abstract_model(cfg, stacked=False)
  shardings = param_shardings(abstract, mesh, rules)["blocks"]
  blocks = params.pop("blocks") if consume else dict(params["blocks"])
  listed: dict[int, dict[str, Any]] = {i: {} for i in range(cfg.num_layers)}
  for name in list(blocks):
    split = splitter(tuple(shardings[i][name] for i in range(cfg.num_layers)))
    stacked = blocks.pop(name)
    layers = jax.eval_shape(split, stacked) if isinstance(stacked, jax.ShapeDtypeStruct) else split(stacked)
    del stacked  # with `consume`, the last reference: freed before the next weight is split
    for i, layer in enumerate(layers):
      listed[i][name] = layer
  return {k: v for k, v in params.items() if k != "blocks"} | {"blocks": listed}


@functools.cache
def splitter(shardings: tuple[NamedSharding, ...]) -> Any:
  """One compiled split of a stacked weight into its layers, shared by every sampler that loads it."""
  return jax.jit(lambda x: [x[i] for i in range(len(shardings))], out_shardings=list(shardings))


def is_matrix(axes: tuple[str, ...]) -> bool:
  """A weight that multiplies activations (or is looked up); a per-layer stack of vectors is not one."""
  return len([a for a in axes if a != "layers"]) >= 2


def logical_axes(abstract: nnx.State) -> dict[str, Any]:
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], abstract,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


# The setting behind each logical axis of the parameters, for errors.
SIZE_KEYS = {"vocab": "model.vocab_size", "embed": "model.d_model", "heads": "model.num_heads",
             "kv_heads": "model.num_kv_heads", "head_dim": "model.head_dim", "mlp": "model.d_ff",
             "layers": "model.num_layers"}


def param_shardings(abstract: nnx.State, mesh: Mesh, rules: dict[str, list[str]]) -> dict[str, Any]:
  """Fails with one line, before anything compiles, where a mesh axis does not divide what it splits."""
  shapes = nnx.to_pure_dict(abstract)

  def named(axes: tuple[str, ...], var: Any) -> NamedSharding:
    out = sharding.named(mesh, axes, rules)
    for name, size, entry in zip(axes, var.shape, out.spec):
      if size % (parts := sharding.shards(mesh, entry)):
        over = entry if isinstance(entry, str) else " x ".join(entry)
        raise ConfigError(f"{SIZE_KEYS.get(name, name)}={size} is not divisible by {parts}, the size of mesh axis "
                          f"{over} that mesh.rules.{name} splits it over; change one of them")
    return out

  return jax.tree.map(named, logical_axes(abstract), shapes, is_leaf=lambda x: isinstance(x, tuple))
