"""The compiled step: mesh equivalence, gradient accumulation, loss masking, optimizer details."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def test_gradient_accumulation_gives_the_mean_gradient_over_all_real_tokens():
  """Micro-batches with very different padding: each token weighs the same whether or not the batch is
  split, and the gradient (read from Adam's first moment, with clipping off) and its norm are those of the
  mean NLL over the batch's real tokens, taken by jax.grad of an independent loss."""
  batch = packed_batch()
  batch["segment_ids"][0::2, 6:] = 0  # micro-batch 0 of 2 (rows 0, 2, 4, 6) is mostly padding
  real = batch["segment_ids"] != 0

  def mean_nll(graphdef, params):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(jnp.where(real, nll, 0.0)) / real.sum()

  for accum in (1, 2):
    cfg = make_cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.clip_norm=1e9", f"train.grad_accum={accum}")
    steps = Steps(cfg, sharding.make_mesh(cfg.mesh))
    state = steps.init_state(0)
    params = jax.tree.map(np.asarray, state.params)
    loss, reference = jax.jit(jax.value_and_grad(lambda p: mean_nll(steps.graphdef, p)))(params)
    state, metrics = steps.train_step(state, steps.shard_batch(batch))
    grads = jax.tree.map(lambda mu: np.asarray(mu) / (1 - cfg.train.b1), state.opt_state[1][0].mu)
    assert max_diff(grads, reference) < 1e-6, accum
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(reference)), rel=1e-5), accum
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5), accum


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


def test_evaluation_takes_a_micro_batch_at_a_time_as_training_does():
  """With train.grad_accum=4 the held-out sums are the whole batch's, and the compiled evaluation's
  temporaries (the logits above all) are a quarter batch's: all rows at once need memory that
  training, split into micro-batches, never does."""
  batch = packed_batch()
  sums, temporaries = {}, {}
  for accum in (1, 4):
    cfg = make_cfg("mesh.data=2", "model.vocab_size=4096", f"train.grad_accum={accum}")
    steps = Steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:2]))
    params, sharded = steps.init_state(0).params, steps.shard_batch(batch)
    sums[accum] = {k: float(v) for k, v in steps.eval_step(params, sharded).items()}
    temporaries[accum] = steps.eval_step.lower(params, sharded).compile().memory_analysis().temp_size_in_bytes
  assert sums[4]["tokens"] == sums[1]["tokens"] == 8 * 32 - 4
  assert sums[4]["nll"] == pytest.approx(sums[1]["nll"], rel=1e-5)
  assert temporaries[4] < 0.5 * temporaries[1]


def test_z_loss_adds_its_term_to_the_gradient_but_not_to_the_reported_loss():
  """train.z_loss=0.1: the gradient (Adam's first moment, clipping off) is jax.grad of an independent
  mean over real tokens of NLL + 0.1 log(Z)^2; the loss reported is the mean NLL alone."""
  batch = packed_batch()
  real = batch["segment_ids"] != 0

  def objective(graphdef, params, z):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(jnp.where(real, nll + z * logz**2, 0.0)) / real.sum(), jnp.sum(jnp.where(real, nll, 0.0)) / real.sum()

  cfg = make_cfg("mesh.data=1", "train.clip_norm=1e9", "train.z_loss=0.1")
  steps = Steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = steps.init_state(0)
  params = jax.tree.map(np.asarray, state.params)
  grad = jax.jit(jax.grad(lambda p, z: objective(steps.graphdef, p, z), has_aux=True))
  (reference, nll), (without, _) = grad(params, 0.1), grad(params, 0.0)
  state, metrics = steps.train_step(state, steps.shard_batch(batch))
  grads = jax.tree.map(lambda mu: np.asarray(mu) / (1 - cfg.train.b1), state.opt_state[1][0].mu)
  assert max_diff(grads, reference) < 1e-6 < max_diff(grads, without)
  assert float(metrics["loss"]) == pytest.approx(float(nll), rel=1e-5)


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
  with pytest.raises(ConfigError, match=r"^mesh.rules.mlp names mesh axis 'nope'; mesh axes: data, fsdp, tensor$"):
    sharding.make_mesh(config.load(None, ["mesh.rules={mlp: [nope]}"]).mesh)
  with pytest.raises(ConfigError, match=r"^mesh.rules.batch=\['data', 'fsdp', 'data'\] names mesh axis 'data' twice; "):
    sharding.make_mesh(config.load(None, ["mesh.rules={batch: [data, fsdp, data]}"]).mesh)
  cfg = make_cfg("mesh.data=2", "mesh.tensor=4", "model.num_heads=6", "model.num_kv_heads=6", "model.head_dim=16")
  with pytest.raises(ConfigError, match=r"^model.num_kv_heads=6 is not divisible by 4, the size of mesh axis tensor "
                                        r"that mesh.rules.kv_heads splits it over; change one of them$"):
    Steps(cfg, sharding.make_mesh(cfg.mesh))  # before anything compiles


def test_flops_per_token_is_six_per_matmul_weight_plus_attention_and_xla_agrees():
  from lm.flops import flops_per_token

  D, N, K, H, F, V, S = 64, 4, 2, 16, 128, 512, 128
  for layers, tied in ((1, False), (3, True)):
    cfg = make_cfg(f"model.tie_embeddings={tied}", f"model.vocab_size={V}", f"model.num_layers={layers}",
                   "model.max_seq_len=256", f"model.head_dim={H}")
    matmul_weights = layers * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + V * D  # norm scales are not
    assert flops_per_token(cfg.model, S) == 6 * matmul_weights + 12 * layers * N * H * S
  # XLA's count of the one-layer forward and backward pass adds only elementwise work (softmax, norms,
  # rotary), under 5%; attention is 19% of the total here. A scanned loop's body is counted once, hence
  # one layer; the squared loss keeps XLA from simplifying the backward pass of the output projection.
  one_layer = make_cfg("model.tie_embeddings=false", f"model.vocab_size={V}", "model.num_layers=1", "model.max_seq_len=256")
  graphdef, abstract = abstract_model(one_layer.model)
  tokens = jnp.zeros((4, S), jnp.int32)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(tokens) ** 2)

  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), nnx.to_pure_dict(abstract))
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert 1.0 <= cost["flops"] / (flops_per_token(one_layer.model, S) * 4 * S) < 1.05


def test_peak_flops_of_a_device_kind_is_its_parts_not_a_longer_names():
  from lm.flops import device_peak
  assert device_peak("NVIDIA H100 80GB HBM3") == device_peak("NVIDIA H200") == 989e12  # SXM
  assert device_peak("NVIDIA H100 NVL") == device_peak("NVIDIA H200 NVL") == 835e12  # the same die at lower power
  assert device_peak("NVIDIA H100 PCIe") == 756e12
  assert device_peak("NVIDIA A10G") is None and device_peak("NVIDIA A100-SXM4-80GB") == 312e12


def test_learning_rate_schedule_values_against_its_formula():
  from lm.train import schedule

  cfg = make_cfg("train.steps=1000", "train.warmup_steps=100", "train.learning_rate=1e-3", "train.min_lr_ratio=0.1")
  lr, peak, end = schedule(cfg.train), 1e-3, 1e-4

  def cosine(t):
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - 100) / 900))

  assert float(lr(0)) == 0.0 and float(lr(50)) == pytest.approx(peak / 2, rel=1e-6)
  assert float(lr(100)) == pytest.approx(peak, rel=1e-6)  # warmup's end
  assert float(lr(550)) == pytest.approx((peak + end) / 2, rel=1e-6)  # halfway through the decay
  assert float(lr(999)) == pytest.approx(cosine(999), rel=1e-5)  # the last step's update
  assert float(lr(1000)) == pytest.approx(end, rel=1e-6)
