"""Training state, optimizer, loss and the jit-compiled train and eval steps."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import sharding
from lm.config import Config, TrainConfig
from lm.model import Transformer
from lm.params import abstract_model, is_matrix, logical_axes, param_shardings

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: all [B, L] int32


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict[str, Any]
  opt_state: optax.OptState


def decay_mask(abstract: nnx.State) -> dict[str, Any]:
  """Weight decay applies to matrices only, not to norm scales (a per-layer stack is still a vector)."""
  return jax.tree.map(is_matrix, logical_axes(abstract),
                      is_leaf=lambda x: isinstance(x, tuple))


def schedule(cfg: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def optimizer(cfg: TrainConfig, mask: dict[str, Any]) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask),
  )


class Steps:
  """The compiled functions for one config on one mesh: state creation, train step, eval step."""

  def __init__(self, cfg: Config, mesh: Mesh):
    self.cfg, self.mesh, self.rules = cfg, mesh, cfg.mesh.rules
    self.graphdef, abstract = abstract_model(cfg.model)
    self.tx = optimizer(cfg.train, decay_mask(abstract))
    self.schedule = schedule(cfg.train)
    replicated = NamedSharding(mesh, P())
    params_sh = param_shardings(abstract, mesh, self.rules)
    abstract_params = nnx.to_pure_dict(abstract)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abstract_params), params_sh,
                                   transform_non_params=lambda _: replicated)
    self.state_shardings = TrainState(step=replicated, params=params_sh, opt_state=opt_sh)
    self.batch_sharding = sharding.named(mesh, ("batch", None), self.rules)
    self.replicated = replicated
    self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
    self._from_params = jax.jit(self._from_params_fn, in_shardings=(params_sh,), out_shardings=self.state_shardings)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step, in_shardings=(params_sh, self.batch_sharding), out_shardings=replicated)

  def init_state(self, seed: int) -> TrainState:
    return self._init(jax.random.key(seed))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring onto this mesh."""
    shapes = jax.eval_shape(self._init_fn, jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings)

  def state_from_params(self, params: dict[str, Any]) -> TrainState:
    """Step 0 and a fresh optimizer around given parameters (fine-tuning)."""
    return self._from_params(params)

  def _from_params_fn(self, params: dict[str, Any]) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

  def _init_fn(self, key: jax.Array) -> TrainState:
    params = nnx.to_pure_dict(nnx.state(Transformer(self.cfg.model, nnx.Rngs(params=key))))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

  def _sums(self, params: dict[str, Any], batch: Batch, scale: jax.Array = 1.0
            ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Summed NLL (plus z-loss) over real target tokens, times `scale`; padding has segment id 0."""
    with sharding.activation_rules(self.mesh, self.rules):
      logits_BxLxV = nnx.merge(self.graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    nll_BxL = logz_BxL - jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    real_BxL = (batch["segment_ids"] != 0).astype(jnp.float32)
    nll = jnp.sum(nll_BxL * real_BxL)
    objective = nll
    if self.cfg.train.z_loss:
      objective += self.cfg.train.z_loss * jnp.sum(logz_BxL**2 * real_BxL)
    return objective * scale, (nll, jnp.sum(real_BxL))

  def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    # The mean over the whole batch's tokens is taken inside the gradient: no pass over the gradients.
    tokens = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    grad_fn = jax.grad(self._sums, has_aux=True)
    A = self.cfg.train.grad_accum
    if A == 1:
      grads, (nll, _) = grad_fn(state.params, batch, scale)
    else:
      def accumulate(carry, mb):
        grads, (nll, _) = grad_fn(state.params, jax.lax.with_sharding_constraint(mb, self.batch_sharding), scale)
        return jax.tree.map(jnp.add, carry, (grads, nll)), None

      (grads, nll), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(())), self._micro(batch))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": nll * scale, "grad_norm": optax.tree.norm(grads), "learning_rate": self.schedule(state.step),
               "tokens": tokens}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _micro(self, batch: Batch) -> Batch:
    """The batch as `train.grad_accum` micro-batches, stacked. Row r of micro-batch i is global row
    r * A + i, so every device keeps its own rows."""
    A = self.cfg.train.grad_accum
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // A, A, *x.shape[1:]), 0, 1), batch)

  def _eval_step(self, params: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
    # A micro-batch at a time, as training: the whole batch's logits at once need grad_accum times the memory.
    def add(carry, mb):
      _, sums = self._sums(params, jax.lax.with_sharding_constraint(mb, self.batch_sharding))
      return jax.tree.map(jnp.add, carry, sums), None

    (nll, tokens), _ = jax.lax.scan(add, (jnp.zeros(()), jnp.zeros(())), self._micro(batch))
    return {"nll": nll, "tokens": tokens}

  def shard_batch(self, local_batch: dict[str, Any]) -> Batch:
    """Builds global arrays from this process's rows of the global batch."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}
