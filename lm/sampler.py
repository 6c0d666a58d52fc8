"""KV-cached sampling: one prefill pass over the prompt batch, then a `lax.scan` of decode steps.

Rows are right-padded to a prompt-length bucket; each row keeps its own positions, so its output never
depends on the other rows. Decode step t writes slot P + t of a cache of P + max_new_tokens slots.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lm import config, sharding
from lm.checkpoint import open_run, run_tokenizer
from lm.config import Config, ConfigError
from lm.params import abstract_model, param_shardings
from lm.quantize import quantized
from lm.tokenizer import Tokenizer

MIN_BUCKET = 16
MAX_STOP_TOKENS = 8  # stop ids are padded to this many (with -1, never a token), so one compile serves all


@dataclasses.dataclass
class Completion:
  prompt: str
  text: str
  token_ids: list[int]
  finish_reason: str  # "stop": a stop token ended it (not included); "length": max_new_tokens reached
  logprobs: list[float] | None = None


@dataclasses.dataclass
class Timing:
  prefill_tokens: int = 0
  prefill_seconds: float = 0.0
  decode_tokens: int = 0
  decode_seconds: float = 0.0
  compile_seconds: float = 0.0


def bucket(length: int, limit: int) -> int:
  """Prompt lengths round up to a power of two (so few shapes compile), never past `limit`."""
  return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


def choose(keys_B: jax.Array, logits_BxV: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next tokens and their log-probabilities under the model. Temperature 0 is greedy; top_k 0 and
  top_p 1 switch those filters off. Each row draws from its own key."""
  logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_BxV = -jnp.sort(-scaled, axis=-1)
  V = logits_BxV.shape[-1]
  kth = jnp.where(top_k > 0, sorted_BxV[:, jnp.clip(top_k - 1, 0, V - 1)], -jnp.inf)
  sorted_BxV = jnp.where(sorted_BxV >= kth[:, None], sorted_BxV, -jnp.inf)
  probs = jax.nn.softmax(sorted_BxV, axis=-1)
  in_nucleus = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest prefix reaching top_p
  threshold = jnp.min(jnp.where(in_nucleus, sorted_BxV, jnp.inf), axis=-1)
  filtered = jnp.where(scaled >= jnp.maximum(threshold, kth)[:, None], scaled, -jnp.inf)
  sampled = jax.vmap(jax.random.categorical)(keys_B, filtered)
  tokens = jnp.where(temperature == 0, jnp.argmax(logits_BxV, axis=-1), sampled)
  return tokens, jnp.take_along_axis(logprobs_BxV, tokens[:, None], axis=-1)[:, 0]


class Sampler:
  def __init__(self, cfg: Config, params: Any, tokenizer: Tokenizer, mesh: Mesh, quantize: str | None = None):
    """`quantize="int8"`: int8 weights computed from `params` (lm.quantize); they replace them."""
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    self.graphdef, _ = abstract_model(cfg.model)
    self.rules = cfg.mesh.rules
    if quantize:
      self.graphdef, self.params = quantized(params, cfg.model, mesh, self.rules, quantize)
    self.rows_multiple = sharding.data_parallel_size(mesh, self.rules)
    self.cache_sharding = sharding.named(mesh, ("layers", "batch", None, "kv_heads", None), self.rules)
    self.compiled: dict[tuple[int, int, int], tuple[Any, Any]] = {}
    self.timing = Timing()

  @classmethod
  def from_workdir(cls, workdir: str | Path, step: int | None = None, mesh_cfg: config.MeshConfig | None = None,
                   quantize: str | None = None) -> "Sampler":
    """The newest (or the given) checkpoint of a run, restored onto this process's devices, whatever
    mesh it was trained on. The default mesh shards parameters over all devices (`fsdp`)."""
    workdir = Path(workdir)
    ckpts, step, meta = open_run(workdir, step)
    cfg = config.from_dict(meta["config"])
    saved_rules = cfg.mesh.rules
    cfg.mesh = mesh_cfg or config.MeshConfig(data=1, fsdp=-1, tensor=1)
    cfg.mesh.rules = saved_rules
    mesh = sharding.make_mesh(cfg.mesh)
    _, abstract = abstract_model(cfg.model)
    shardings = param_shardings(abstract, mesh, cfg.mesh.rules)
    targets = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                           nnx.to_pure_dict(abstract), shardings)
    params = ckpts.restore_params(step, targets)
    ckpts.close()
    return cls(cfg, params, Tokenizer(run_tokenizer(workdir, meta)), mesh, quantize)

  def encode(self, prompt: str) -> list[int]:
    bos = self.tokenizer.bos_id
    return ([bos] if bos >= 0 else []) + self.tokenizer.encode(prompt)

  def _rows(self, x: np.ndarray) -> jax.Array:
    """A batch-sharded global array from a host array that every process holds whole."""
    rows = sharding.named(self.mesh, ("batch",) + (None,) * (x.ndim - 1), self.rules)
    return jax.make_array_from_callback(x.shape, rows, lambda index: x[index])

  def _prefill_fn(self, params, tokens_BxP, lengths_B, key_data_B, temperature, top_k, top_p, cache_len):
    B, Pn = tokens_BxP.shape
    keys_B = jax.random.wrap_key_data(key_data_B)
    model = nnx.merge(self.graphdef, params)
    segments = (jnp.arange(Pn)[None] < lengths_B[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(Pn), (B, Pn))
    with sharding.activation_rules(self.mesh, self.rules):
      logits, (k, v) = model.prefill(tokens_BxP, segments, positions)
    pad = [(0, 0), (0, 0), (0, cache_len - Pn), (0, 0), (0, 0)]
    cache = tuple(jax.lax.with_sharding_constraint(jnp.pad(c, pad).astype(model.dtype), self.cache_sharding)
                  for c in (k, v))
    last_BxV = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    token, logprob = choose(jax.vmap(jax.random.fold_in)(keys_B, jnp.zeros_like(lengths_B)), last_BxV,
                            temperature, top_k, top_p)
    return cache, token, logprob

  def _decode_fn(self, params, cache, token_B, logprob_B, lengths_B, key_data_B, temperature, top_k, top_p,
                 stop_ids, steps):
    model = nnx.merge(self.graphdef, params)
    keys_B = jax.random.wrap_key_data(key_data_B)
    S = cache[0].shape[2]
    prompt_slots = S - steps
    visible_BxS = jnp.arange(S)[None] < lengths_B[:, None]

    def step(carry, t):
      cache, visible_BxS, token_B, logprob_B, done_B = carry
      emitted = (token_B, logprob_B, done_B)
      done_B = done_B | jnp.any(token_B[:, None] == stop_ids[None], axis=-1)
      slot = prompt_slots + t
      visible_BxS = visible_BxS.at[:, slot].set(True)
      with sharding.activation_rules(self.mesh, self.rules):
        logits, cache = model.decode(token_B[:, None], (lengths_B + t)[:, None], cache, slot, visible_BxS[:, None])
      keys = jax.vmap(jax.random.fold_in)(keys_B, jnp.full_like(lengths_B, t + 1))
      token_B, logprob_B = choose(keys, logits[:, 0], temperature, top_k, top_p)
      return (cache, visible_BxS, token_B, logprob_B, done_B), emitted

    carry = (cache, visible_BxS, token_B, logprob_B, jnp.zeros_like(lengths_B, bool))
    (cache, *_), (tokens, logprobs, _) = jax.lax.scan(step, carry, jnp.arange(steps))
    return cache, tokens.T, logprobs.T  # the cache is returned so it is updated in its donated buffers

  def compiled_functions(self, rows: int, prompt_len: int, steps: int, args: tuple) -> tuple[Any, Any]:
    """Compiled prefill and decode, cached per (rows, prompt bucket, new tokens); `args` are the
    prefill's (arrays, or shapes with shardings when compiling ahead of time)."""
    key = (rows, prompt_len, steps)
    if key not in self.compiled:
      start = time.perf_counter()
      prefill = jax.jit(self._prefill_fn, static_argnames="cache_len").lower(*args, cache_len=prompt_len + steps).compile()
      cache, token, logprob = jax.eval_shape(functools.partial(self._prefill_fn, cache_len=prompt_len + steps), *args)
      decode = jax.jit(self._decode_fn, static_argnames="steps", donate_argnums=1).lower(
          self.params, cache, token, logprob, *args[2:], jax.ShapeDtypeStruct((MAX_STOP_TOKENS,), jnp.int32),
          steps=steps).compile()
      self.compiled[key] = (prefill, decode)
      self.timing.compile_seconds += time.perf_counter() - start
    return self.compiled[key]

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
               batch_size: int = 16, logprobs: bool = False, stop_tokens: Sequence[int] = ()) -> list[Completion]:
    """`num_samples` completions per prompt, in prompt order. Sample j of prompt i draws from its own
    key (seed, i, j), so it does not depend on batching."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    encoded = []
    for i, prompt in enumerate(prompts):
      if not prompt:
        raise ConfigError(f"prompt {i} is empty")
      ids = self.encode(prompt)
      if len(ids) + max_new_tokens > self.cfg.model.max_seq_len:
        raise ConfigError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's max_seq_len={self.cfg.model.max_seq_len}")
      encoded.append(ids)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    stops = sorted({*stop_tokens, self.tokenizer.eos_id} - {-1})
    if len(stops) > MAX_STOP_TOKENS:
      raise ConfigError(f"{len(stops)} stop tokens (end-of-sequence included); at most {MAX_STOP_TOKENS} are supported")
    out: list[Completion] = []
    for start in range(0, len(jobs), batch_size):
      out += self._batch(prompts, encoded, jobs[start:start + batch_size], max_new_tokens, temperature, top_k,
                         top_p, seed, logprobs, stops)
    return out

  def _batch(self, prompts, encoded, jobs, steps, temperature, top_k, top_p, seed, want_logprobs, stops):
    rows = 1 << (len(jobs) - 1).bit_length()  # few row counts, so few compiles
    rows = -(-rows // self.rows_multiple) * self.rows_multiple
    longest = max(len(encoded[i]) for i, _ in jobs)
    prompt_len = bucket(longest, self.cfg.model.max_seq_len - steps)
    tokens = np.zeros((rows, prompt_len), np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, (i, _) in enumerate(jobs):
      tokens[r, :len(encoded[i])] = encoded[i]
      lengths[r] = len(encoded[i])
    base = jax.random.key(seed)
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base, i), j) for i, j in jobs]
                     + [base] * (rows - len(jobs)))
    tokens_d, lengths_d, keys_d = (self._rows(x) for x in (tokens, lengths, np.asarray(jax.random.key_data(keys))))
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    args = (self.params, tokens_d, lengths_d, keys_d, *knobs)
    prefill, decode = self.compiled_functions(rows, prompt_len, steps, args)
    start = time.perf_counter()
    cache, token, logprob = jax.block_until_ready(prefill(*args))
    mid = time.perf_counter()
    stop_ids = jnp.asarray(stops + [-1] * (MAX_STOP_TOKENS - len(stops)), jnp.int32)
    _, ids, lps = decode(self.params, cache, token, logprob, lengths_d, keys_d, *knobs, stop_ids)
    ids, lps = multihost_utils.process_allgather((ids, lps), tiled=True)
    end = time.perf_counter()
    t = self.timing
    t.prefill_tokens += int(lengths.sum())
    t.prefill_seconds += mid - start
    t.decode_tokens += rows * steps
    t.decode_seconds += end - mid
    results = []
    for r, (i, _) in enumerate(jobs):
      stop_at = next((n for n in range(steps) if ids[r, n] in stops), None)
      kept = ids[r, :stop_at].tolist()
      results.append(Completion(prompt=prompts[i], text=self.tokenizer.decode(kept), token_ids=kept,
                                finish_reason="length" if stop_at is None else "stop",
                                logprobs=lps[r, :len(kept)].tolist() if want_logprobs else None))
    return results


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, num_samples: int) -> None:
  checks = [
      (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be at least 1"),
      (temperature >= 0, f"temperature={temperature} must be >= 0 (0 is greedy)"),
      (top_k >= 0, f"top_k={top_k} must be >= 0 (0 keeps every token)"),
      (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]"),
      (num_samples >= 1, f"num_samples={num_samples} must be at least 1"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def generate(model_or_checkpoint: Sampler | str | Path, prompts: Sequence[str], **kwargs: Any) -> list[Completion]:
  """Samples from a `Sampler` or from a work directory's newest checkpoint; see `Sampler.generate`."""
  sampler = model_or_checkpoint if isinstance(model_or_checkpoint, Sampler) else Sampler.from_workdir(model_or_checkpoint)
  return sampler.generate(prompts, **kwargs)
