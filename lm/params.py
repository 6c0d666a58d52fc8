"""The model's parameters without the training step: their abstract shapes, logical axes and shardings."""

from __future__ import annotations

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


def unstack(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh, rules: dict[str, list[str]]) -> dict[str, Any]:
  """Stacked parameters (a checkpoint's) as those of `Transformer(cfg, stacked=False)`, each layer's
  weights arrays of their own, split where they lie. Abstract params (shapes with shardings) give
  abstract ones. Listed ones (another sampler's) are returned as they are."""
  if all(isinstance(key, int) for key in params["blocks"]):
    return params
  _, abstract = abstract_model(cfg, stacked=False)
  split = jax.jit(lambda p: p | {"blocks": {i: jax.tree.map(lambda x: x[i], p["blocks"]) for i in range(cfg.num_layers)}},
                  out_shardings=param_shardings(abstract, mesh, rules))
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return jax.eval_shape(split, params)
  return split(params)


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
