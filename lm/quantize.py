"""Weight-only int8 for sampling: every matrix (the projections and the embedding table) becomes a
`qwix.QArray` of int8 values with one scale per output channel, computed from the float parameters
when they are loaded. Activations, the key/value cache and the softmax keep the compute dtype:
`lm.model.dense` hands a QArray to `qwix.dot`, which rescales it to the compute dtype for the matmul."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import Mesh

from lm import sharding
from lm.config import ConfigError, ModelConfig
from lm.model import Transformer
from lm.params import abstract_model, is_matrix

MODES = ("int8",)
# The axes each matrix contracts where the model reads it; every other axis (the layer axis included)
# is an output channel with its own scale. The embedding table's rows (vocab) are the output channels
# of the tied unembedding and the units of the lookup.
CONTRACTED = {"wq": ("embed",), "wk": ("embed",), "wv": ("embed",), "wo": ("heads", "head_dim"),
              "w_gate": ("embed",), "w_up": ("embed",), "w_down": ("mlp",), "embed": ("embed",),
              "unembed": ("embed",)}


def check(mode: str | None) -> None:
  if mode is not None and mode not in MODES:
    raise ConfigError(f"--quantize '{mode}' is not one of: {', '.join(MODES)}")


def quantize_model(model: Transformer) -> Transformer:
  """Replaces, in place, the value of every matrix Param by its int8 QArray; norm scales stay float.
  Scales are kept in the compute dtype, to which the model casts every weight anyway."""
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and is_matrix(var.get_metadata()["axes"]):
      axes = var.get_metadata()["axes"]
      channels = tuple(i for i, a in enumerate(axes) if a not in CONTRACTED[path[-1]])
      var.set_value(qwix.quantize(var.get_value(), jnp.int8, channelwise_axes=channels, scale_dtype=model.dtype))
  return model


def abstract_quantized(cfg: ModelConfig, stacked: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
  return nnx.split(nnx.eval_shape(lambda: quantize_model(Transformer(cfg, nnx.Rngs(0), stacked))))


def shardings(abstract: nnx.State, mesh: Mesh, rules: dict[str, list[str]]) -> dict[str, Any]:
  """Int8 values shard like the float matrix; a scale is whole along the axes it does not vary on."""

  def one(var: nnx.Variable):
    axes, value = var.get_metadata()["axes"], var.get_value()
    if not isinstance(value, qwix.QArray):
      return sharding.named(mesh, axes, rules)
    scale_axes = tuple(a if s == q else None for a, s, q in zip(axes, value.scale.shape, value.qvalue.shape))
    return value.replace(qvalue=sharding.named(mesh, axes, rules), scale=sharding.named(mesh, scale_axes, rules))

  return nnx.to_pure_dict(jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def quantized(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh, rules: dict[str, list[str]], mode: str,
              stacked: bool = True) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """The quantized model's graph definition and its parameters (of `Transformer(cfg, stacked=...)`),
  computed where the float ones lie (never gathered). Abstract params (shapes with shardings, as
  launch.aot compiles) give abstract ones."""
  check(mode)
  float_graphdef, _ = abstract_model(cfg, stacked)
  graphdef, abstract = abstract_quantized(cfg, stacked)
  to_int8 = jax.jit(lambda p: nnx.to_pure_dict(nnx.state(quantize_model(nnx.merge(float_graphdef, p)))),
                    out_shardings=shardings(abstract, mesh, rules))
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return graphdef, jax.eval_shape(to_int8, params)
  return graphdef, to_int8(params)
