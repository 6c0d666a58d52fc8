"""The int8 key/value cache: its rounding against a per-token, per-head numpy reference, its attention
against float attention on the dequantized cache, and sampling with it against the float cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import speculative
from lm.config import ConfigError
from lm.kv_cache import Int8KV
from lm.model import attend_heads_first
from lm.sampler import Sampler
from tests.test_sampler import PROMPTS, make_sampler


def dequantized(entry: Int8KV) -> np.ndarray:
  return np.asarray(entry.values_BxKxSxH, np.float32) * np.asarray(entry.scales_BxKxS, np.float32)[..., None]


@pytest.mark.parametrize("L", [1, 3])  # one query per head (the CPU's per-head path) and several
def test_int8_attention_equals_float_attention_on_the_dequantized_cache(L):
  rng = np.random.default_rng(0)
  B, N, K, S, H = 2, 4, 2, 24, 16
  q = jnp.asarray(rng.normal(size=(B, L, N, H)), jnp.float32)
  k, v = (Int8KV(jnp.asarray(rng.integers(-127, 128, (B, K, S, H)), jnp.int8),
                 jnp.asarray(rng.uniform(0.001, 0.05, (B, K, S)), jnp.float32)) for _ in range(2))
  mask = jnp.asarray(rng.random((B, L, S)) < 0.7).at[:, :, 0].set(True)
  want = attend_heads_first(q, jnp.asarray(dequantized(k)), jnp.asarray(dequantized(v)), mask)
  np.testing.assert_allclose(attend_heads_first(q, k, v, mask), want, rtol=1e-5, atol=1e-5)


def test_int8_cache_rounds_each_token_and_head_and_samples_like_the_float_cache(tokenizer):
  exact = make_sampler(tokenizer)
  int8 = Sampler(exact.cfg, exact.params, tokenizer, exact.mesh, kv="int8")
  # Prefill writes the float sampler's keys and values rounded per (row, kv head, position): one step
  # per token and head, its largest magnitude mapped to 127.5 (qwix's convention, as for the weights),
  # every value the nearest level.
  ids = [exact.encode(p) for p in PROMPTS]
  P = max(map(len, ids))
  tokens = np.zeros((len(ids), P), np.int32)
  for r, row in enumerate(ids):
    tokens[r, :len(row)] = row
  args = (jnp.asarray(tokens), jnp.asarray([len(r) for r in ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32))
  float_cache = jax.jit(exact.prefill)(exact.params, exact.empty_state(4, 64)["cache"], *args)
  int8_cache = jax.jit(int8.prefill)(int8.params, int8.empty_state(4, 64)["cache"], *args)
  for (fk, fv), (qk, qv) in zip(float_cache, int8_cache):
    for f, q in ((fk, qk), (fv, qv)):
      f, values, scales = np.asarray(f), np.asarray(q.values_BxKxSxH), np.asarray(q.scales_BxKxS)
      assert values.dtype == np.int8 and q.values_BxKxSxH.sharding.spec == fk.sharding.spec
      step = np.abs(f).max(-1, keepdims=True) / 127.5
      np.testing.assert_allclose(scales, step[..., 0], rtol=1e-6)
      assert np.all(np.abs(values * step - f) <= step * (0.5 + 1e-4))
  # Sampling: each token's log-probability against the float model's full forward pass over the
  # sampled text: within 1e-4 with the float cache, within 0.3 (0.08 on average) with the int8 one
  # (measured: 0.14 and 0.036 on this random model's large activations).
  forward = jax.jit(lambda p, tokens: jax.nn.log_softmax(nnx.merge(exact.graphdef, p)(tokens), axis=-1))
  got = {}
  for s, bound, mean in ((exact, 1e-4, 1e-4), (int8, 0.3, 0.08)):
    got[s] = s.generate(PROMPTS, max_new_tokens=12, stop_tokens=(), logprobs=True)
    errors = []
    for prompt, c in zip(PROMPTS, got[s]):
      n, seq = len(exact.encode(prompt)), exact.encode(prompt) + c.token_ids
      logp = np.asarray(forward(exact.params, jnp.asarray([seq])))[0, n - 1 + np.arange(12), c.token_ids]
      errors.append(np.abs(np.asarray(c.logprobs) - logp))
    assert np.max(errors) < bound and np.mean(errors) < mean
  # A row's tokens do not depend on its batch mates: the scales are per row (log-probabilities move by
  # the odd value rounded to the other int8 level in another compiled shape).
  alone = int8.generate(PROMPTS, max_new_tokens=12, stop_tokens=(), logprobs=True, batch_size=1)
  assert [c.token_ids for c in alone] == [c.token_ids for c in got[int8]]
  np.testing.assert_allclose([c.logprobs for c in alone], [c.logprobs for c in got[int8]], atol=0.01)
  # Speculative rounds over int8 caches (the draft's too): the target as its own draft keeps every guess
  # and writes the plain int8 sampler's tokens.
  spec = Sampler(exact.cfg, exact.params, tokenizer, exact.mesh, kv="int8")
  speculative.speculate(spec, speculative.Draft(Sampler(exact.cfg, exact.params, tokenizer, exact.mesh, kv="int8")), 3)
  assert [c.token_ids for c in spec.generate(PROMPTS, max_new_tokens=12, stop_tokens=())] == [c.token_ids for c in got[int8]]
  assert spec.timing.accepted == spec.timing.proposed > 0
  with pytest.raises(ConfigError, match="--kv-cache 'int4' is not one of: int8"):
    Sampler(exact.cfg, exact.params, tokenizer, exact.mesh, kv="int4")
