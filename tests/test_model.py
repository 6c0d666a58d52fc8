"""The network against naive references: attention (ours and the splash kernel), rotary embedding,
causality and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config, sharding, splash
from lm.config import ModelConfig
from lm.model import Transformer, attend, causal_segment_mask, fallback, rope


def small(**kw) -> ModelConfig:
  cfg = dict(vocab_size=97, num_layers=2, d_model=48, num_heads=6, num_kv_heads=2, d_ff=96, max_seq_len=64)
  cfg.update(kw)
  return ModelConfig(**cfg)


def naive_attention(q, k, v, mask):
  """One head at a time, in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, L, N, H = q.shape
  group = N // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      s = q[b, :, n] @ k[b, :, n // group].T / np.sqrt(H)
      s = np.where(mask[b], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n // group]
  return out


def test_attention_matches_naive_per_head_loop():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 7, 6, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, 9, 2, 8)).astype(np.float32) for _ in range(2))
  mask = rng.random((2, 7, 9)) < 0.7
  mask[..., 0] = True
  np.testing.assert_allclose(attend(q, k, v, jnp.asarray(mask)), naive_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("mesh", [None, "data=2 fsdp=2 tensor=2"])
def test_splash_kernel_matches_attention_and_its_gradients(mesh):
  """Packed documents, grouped-query heads; on a mesh, split over batch and heads by shard_map."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(4, 256, n, 16)), jnp.float32) for n in (4, 2, 2))
  segments = jnp.asarray(np.sort(rng.integers(0, 3, (4, 256)), axis=1), jnp.int32)
  mask = causal_segment_mask(segments)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  ours = lambda q, k, v: attend(q, k, v, mask)
  kernel = lambda q, k, v: splash.attend(q, k, v, segments)
  if mesh:
    cfg = config.load(None, [f"mesh.{setting}" for setting in mesh.split()])
    kernel = jax.jit(sharding.activation_rules(sharding.make_mesh(cfg.mesh), cfg.mesh.rules)(kernel))
  np.testing.assert_allclose(kernel(q, k, v), naive_attention(q, k, v, np.asarray(mask)), atol=1e-5)
  for got, want in zip(jax.grad(loss(kernel), (0, 1, 2))(q, k, v), jax.grad(loss(ours), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=2e-5)


def packed_rows() -> tuple[jax.Array, jax.Array, jax.Array]:
  """Two rows of 128 tokens: two documents of 64, and one of 128."""
  tokens = jax.random.randint(jax.random.key(4), (2, 128), 0, 97)
  segments = jnp.repeat(jnp.array([[1, 2], [1, 1]]), 64, axis=1)
  positions = jnp.stack([jnp.arange(128) % 64, jnp.arange(128)])
  return tokens, segments, positions


def test_model_with_splash_attention_matches_model_with_ours():
  inputs = packed_rows()
  xla, kernel = (Transformer(small(attention=kind, max_seq_len=128, num_layers=1), nnx.Rngs(0))
                 for kind in ("xla", "splash"))
  assert "pallas_call" in str(jax.make_jaxpr(kernel)(*inputs))
  assert "pallas_call" not in str(jax.make_jaxpr(xla)(*inputs))
  np.testing.assert_allclose(kernel(*inputs), xla(*inputs), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on NVIDIA GPUs (JAX_PLATFORMS=cuda)")
def test_model_with_cudnn_attention_matches_model_with_ours_on_gpu():
  inputs = packed_rows()
  xla, cudnn = (Transformer(small(attention=kind, dtype="bfloat16", max_seq_len=128), nnx.Rngs(0))
                for kind in ("xla", "cudnn"))
  assert "cudnn" in jax.jit(cudnn).lower(*inputs).as_text()
  want = xla(*inputs)
  assert float(jnp.max(jnp.abs(cudnn(*inputs) - want))) < 0.02 * float(jnp.max(jnp.abs(want)))


def test_a_kernel_that_cannot_apply_is_said_once_and_xla_attention_runs(capsys):
  fallback.cache_clear()
  tokens = jnp.zeros((2, 32), jnp.int32)  # 32 is not a multiple of splash's 128-token blocks
  for kind in ("splash", "splash", "cudnn", "cudnn"):  # traced twice each, as training and sampling do
    jaxpr = str(jax.make_jaxpr(Transformer(small(attention=kind, max_seq_len=32, num_layers=1), nnx.Rngs(0)))(tokens))
    assert "pallas_call" not in jaxpr and "cudnn" not in jaxpr
  lines = capsys.readouterr().out.splitlines()
  assert lines == ["attention: splash does not apply (sequence length 32 is not a multiple of 128); using XLA attention",
                   f"attention: cudnn does not apply (it runs on NVIDIA GPUs, not {jax.default_backend()}); using XLA attention"]


def test_cudnn_is_not_asked_for_an_odd_length_its_gradient_refuses(capsys, monkeypatch):
  """train.seq_len=255 on an NVIDIA GPU in bfloat16: XLA attention, not cuDNN's NotImplementedError at the first step."""
  from lm import model
  fallback.cache_clear()
  monkeypatch.setattr(model, "platform", lambda: "gpu")
  net = Transformer(small(attention="auto", dtype="bfloat16", max_seq_len=32, num_layers=1), nnx.Rngs(0))
  assert "cudnn" not in str(jax.make_jaxpr(net)(jnp.zeros((2, 31), jnp.int32)))
  assert capsys.readouterr().out == "attention: cudnn does not apply (sequence length 31 is odd); using XLA attention\n"


def test_rope_matches_complex_rotation():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
  pos = np.array([[0, 3, 7, 100, 2047]])
  half = 4
  freq = 10000.0 ** (-np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[..., None, None] * freq)
  np.testing.assert_allclose(rope(jnp.asarray(x), jnp.asarray(pos), 10000.0),
                             np.concatenate([z.real, z.imag], -1), atol=1e-4)


def test_rope_is_relative():
  """Scores depend only on the distance between positions."""
  rng = np.random.default_rng(2)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  score = lambda pq, pk: float(jnp.sum(rope(q, jnp.array([[pq]]), 1e4) * rope(k, jnp.array([[pk]]), 1e4)))
  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)


@pytest.mark.parametrize("tie,remat", [(True, "none"), (False, "full"), (True, "save_matmuls")])
def test_future_tokens_never_change_earlier_logits(tie, remat):
  model = Transformer(small(tie_embeddings=tie, remat=remat), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 97)
  a, b = model(tokens), model(changed)
  np.testing.assert_array_equal(a[:, :10], b[:, :10])
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_packed_documents_match_documents_run_alone():
  model = Transformer(small(), nnx.Rngs(0))
  docs = [jax.random.randint(jax.random.key(i), (n,), 0, 97) for i, n in enumerate((5, 8, 3))]
  packed = jnp.concatenate(docs)[None]
  segments = jnp.concatenate([jnp.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
  positions = jnp.concatenate([jnp.arange(len(d)) for d in docs])[None]
  logits = model(packed, segments, positions)[0]
  start = 0
  for d in docs:
    np.testing.assert_allclose(logits[start:start + len(d)], model(d[None])[0], atol=1e-5)
    start += len(d)


def test_parameters_carry_logical_axes_and_stay_float32():
  model = Transformer(small(dtype="bfloat16", tie_embeddings=False), nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata()["axes"]
    assert len(axes) == var[...].ndim, path
    assert var[...].dtype == jnp.float32
    assert (axes[0] == "layers") == (path[0] == "blocks")
  assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32  # logits in float32 for the loss


def test_bfloat16_compute_tracks_float32():
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 97)
  f32 = Transformer(small(), nnx.Rngs(0))(tokens)
  bf16 = Transformer(small(dtype="bfloat16"), nnx.Rngs(0))(tokens)
  assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.05 * float(jnp.max(jnp.abs(f32)))
