"""The model's parameters without the training step: their abstract shapes, logical axes and shardings."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from lm import sharding
from lm.config import ModelConfig
from lm.model import Transformer


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only state; the state's Params carry their logical axes."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


def logical_axes(abstract: nnx.State) -> dict[str, Any]:
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], abstract,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(abstract: nnx.State, mesh: Mesh, rules: dict[str, list[str]]) -> dict[str, Any]:
  return jax.tree.map(lambda axes: sharding.named(mesh, axes, rules), logical_axes(abstract),
                      is_leaf=lambda x: isinstance(x, tuple))
