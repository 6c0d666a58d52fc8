"""The compiled step: mesh equivalence, gradient accumulation, loss masking, optimizer details."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config, sharding
from lm.config import ConfigError
from lm.params import abstract_model
from lm.train import Steps, decay_mask
from tests.conftest import tiny_overrides


def make_cfg(*extra: str) -> config.Config:
  return config.load(None, tiny_overrides(**{"model.vocab_size": 64, "train.steps": 10, "train.warmup_steps": 2}) + list(extra))


def packed_batch(B: int = 8, L: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """Two documents per row, and padding at the end of row 0."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (B, L + 1)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[:, 20:] = 2
  seg[0, 28:] = 0
  pos = np.concatenate([np.tile(np.arange(20), (B, 1)), np.tile(np.arange(L - 20), (B, 1))], 1).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos}


def run_steps(cfg: config.Config, devices, n: int = 3):
  steps = Steps(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = steps.init_state(0)
  losses = []
  for i in range(n):
    state, metrics = steps.train_step(state, steps.shard_batch(packed_batch(seed=i)))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.params), state


def max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_eight_device_mesh_matches_one_device():
  one_losses, one_params, _ = run_steps(make_cfg("mesh.data=1"), jax.devices()[:1])
  cfg8 = make_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  losses, params, state = run_steps(cfg8, jax.devices())
  np.testing.assert_allclose(losses, one_losses, atol=1e-5)
  assert max_diff(params, one_params) < 1e-5
  wq = state.params["blocks"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (2, 32, 2, 16)
  # Adam moments are sharded like the parameters they belong to.
  mu = state.opt_state[1][0].mu["blocks"]["wq"]
  assert mu.sharding.spec == wq.sharding.spec


def test_gradient_accumulation_matches_one_big_batch():
  base_losses, base_params, _ = run_steps(make_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), jax.devices())
  losses, params, _ = run_steps(make_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=2"), jax.devices())
  np.testing.assert_allclose(losses, base_losses, atol=1e-5)
  assert max_diff(params, base_params) < 1e-5


def test_loss_is_mean_nll_over_real_tokens():
  cfg = make_cfg("mesh.data=1")
  steps = Steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = steps.init_state(0)
  batch = packed_batch()
  out = steps.eval_step(state.params, steps.shard_batch(batch))
  model = nnx.merge(steps.graphdef, jax.tree.map(np.asarray, state.params))
  logits = np.asarray(model(batch["inputs"], batch["segment_ids"], batch["positions"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  real = batch["segment_ids"] != 0
  assert float(out["tokens"]) == real.sum() == 8 * 32 - 4
  assert float(out["nll"]) == pytest.approx(nll[real].sum(), rel=1e-5)


def test_z_loss_changes_gradients_but_not_reported_loss():
  cfg = make_cfg("mesh.data=1")
  plain_losses, plain_params, _ = run_steps(cfg, jax.devices()[:1], n=2)
  z_losses, z_params, _ = run_steps(make_cfg("mesh.data=1", "train.z_loss=0.1"), jax.devices()[:1], n=2)
  assert z_losses[0] == pytest.approx(plain_losses[0], abs=1e-6)
  assert max_diff(plain_params, z_params) > 1e-6


def test_weight_decay_only_on_matrices():
  _, abstract = abstract_model(make_cfg().model)
  mask = decay_mask(abstract)
  assert mask["blocks"]["w_up"] and mask["blocks"]["wq"] and mask["embed"]
  assert not mask["blocks"]["attn_norm"] and not mask["final_norm"]


def test_params_are_created_sharded_never_whole_on_one_device():
  cfg = make_cfg("mesh.data=1", "mesh.fsdp=8")
  steps = Steps(cfg, sharding.make_mesh(cfg.mesh))
  hlo = steps._init.lower(jax.random.key(0)).compile().as_text()
  state = steps.init_state(0)
  embed = state.params["embed"]
  assert embed.addressable_shards[0].data.shape == (64, 8)  # [vocab, embed / 8]
  assert "all-gather" not in hlo


def test_mesh_and_batch_errors_name_the_numbers():
  with pytest.raises(ConfigError, match="needs 6 devices, but 8 are available"):
    sharding.make_mesh(config.load(None, ["mesh.data=3", "mesh.fsdp=2"]).mesh)
  with pytest.raises(ConfigError, match="cannot fill 8 devices"):
    sharding.make_mesh(config.load(None, ["mesh.data=-1", "mesh.fsdp=3"]).mesh)
  mesh = sharding.make_mesh(config.load(None, ["mesh.data=4", "mesh.fsdp=2"]).mesh)
  with pytest.raises(ConfigError, match=r"train.batch_size=12 is not divisible by the data-parallel size 8"):
    sharding.check_batch(12, mesh, config.MeshConfig().rules)


def test_flops_per_token_agrees_with_xla_cost_analysis():
  from lm.flops import flops_per_token

  # One layer: XLA's cost analysis counts a scanned loop's body once.
  cfg = make_cfg("model.tie_embeddings=false", "model.vocab_size=512", "model.num_layers=1")
  graphdef, abstract = abstract_model(cfg.model)
  tokens = jnp.zeros((4, 32), jnp.int32)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(tokens))

  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(abstract))
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] == pytest.approx(flops_per_token(cfg.model, 32) * 4 * 32, rel=0.15)
