"""The sampling engine: continuous batching over a fixed set of slots, with a KV cache.

The engine keeps `batch_size` slots, each one row of a key/value cache. Between compiled chunks of
up to `chunk` decode steps (one loop, which ends after a step in which a row finishes), the
host loop in `Sampler.run` retires rows that emitted a stop token or reached their budget and inserts
waiting prompts into the free slots: a prefill of all but each prompt's last token, whose keys and
values are written into those slots' cache rows; the row's first decode step feeds the last token and
draws its first new one. Each row keeps its own position and its own random key (seed, prompt,
sample), folded with the index of the token it draws, so a row's tokens do not depend on its slot,
its batch mates, the chunk length or the batch size.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lm import config, distributed, kv_cache, sharding
from lm.checkpoint import open_run, run_tokenizer
from lm.config import Config, ConfigError
from lm.params import abstract_model, param_shardings, unstack
from lm.quantize import check as check_quantize
from lm.quantize import quantized
from lm.tokenizer import Tokenizer

MIN_BUCKET = 16
MAX_STOP_TOKENS = 8  # stop ids are padded to this many (with -1, never a token), so one compile serves all


@dataclasses.dataclass
class Request:
  index: int  # the prompt's position in the job
  sample: int
  prompt: str
  ids: list[int]
  budget: int  # at most this many new tokens


@dataclasses.dataclass
class Completion:
  prompt: str
  text: str
  token_ids: list[int]
  finish_reason: str  # "stop": a stop token ended it (not included); "length": max_new_tokens reached
  logprobs: list[float] | None = None
  index: int = 0
  sample: int = 0


@dataclasses.dataclass
class Timing:
  prefill_tokens: int = 0
  prefill_seconds: float = 0.0
  decode_tokens: int = 0  # kept tokens only: no empty slots, nothing after a stop
  decode_seconds: float = 0.0
  compile_seconds: float = 0.0
  target_passes: int = 0  # speculative decoding: rounds of live rows, their proposed and accepted tokens
  proposed: int = 0
  accepted: int = 0


@dataclasses.dataclass
class Knobs:
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def arrays(self) -> tuple[jax.Array, ...]:
    return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)

  def seed_key(self) -> jax.Array:
    """The seed's key as data: one compile serves every seed."""
    return jax.random.key_data(jax.random.key(self.seed))


@dataclasses.dataclass
class Slot:
  request: Request
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  finished: bool = False


def bucket(length: int, limit: int) -> int:
  """Lengths round up to a power of two (so few shapes compile), never past `limit`."""
  return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


def prompt_bucket(length: int, limit: int) -> int:
  """A prefill's padded length: up to a multiple of an eighth of the next power of two (at least
  MIN_BUCKET): under a quarter of padding past 64 tokens, in few shapes (16 up to 512 tokens, four more
  per doubling), never past `limit`."""
  length = max(length, 1)
  step = max(MIN_BUCKET, (1 << (length - 1).bit_length()) // 8)
  return min(-(-length // step) * step, limit)


def prefill_rows(prompts: int, multiple: int) -> int:
  """The rows of one prefill call for `prompts` prompts of one bucket: a power of two times `multiple`
  (the fewest rows the mesh splits evenly), so few shapes compile."""
  return multiple << ((-(-prompts // multiple)).bit_length() - 1)


def scaled_logits(logits_BxV: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """The logits a sampled token is drawn from: divided by the temperature, with -inf outside the top
  k and outside the nucleus. Only top-k/top-p sort the vocabulary."""
  V = logits_BxV.shape[-1]

  def filtered(scaled):
    sorted_BxV = -jnp.sort(-scaled, axis=-1)
    kth = jnp.where(top_k > 0, sorted_BxV[:, jnp.clip(top_k - 1, 0, V - 1)], -jnp.inf)
    sorted_BxV = jnp.where(sorted_BxV >= kth[:, None], sorted_BxV, -jnp.inf)
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    in_nucleus = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest prefix reaching top_p
    threshold = jnp.min(jnp.where(in_nucleus, sorted_BxV, jnp.inf), axis=-1)
    return jnp.where(scaled >= jnp.maximum(threshold, kth)[:, None], scaled, -jnp.inf)

  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  return jax.lax.cond((top_k > 0) | (top_p < 1), filtered, lambda x: x, scaled)


def choose(keys_B: jax.Array, logits_BxV: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Next tokens and their log-probabilities. Temperature 0 is greedy; top_k 0 and top_p 1 switch
  those filters off. Each row draws from its own key. Ids from `vocab` on (a padded vocabulary's
  tail) are never chosen."""
  V = logits_BxV.shape[-1]
  if vocab is not None and vocab < V:
    logits_BxV = jnp.where(jnp.arange(V) < vocab, logits_BxV, -jnp.inf)

  def sample():
    return jax.vmap(jax.random.categorical)(keys_B, scaled_logits(logits_BxV, temperature, top_k, top_p))

  tokens = jax.lax.cond(temperature == 0, lambda: jnp.argmax(logits_BxV, axis=-1), sample)
  chosen = jnp.take_along_axis(logits_BxV, tokens[:, None], axis=-1)[:, 0]
  return tokens, chosen - jax.nn.logsumexp(logits_BxV, axis=-1)


def chunk_loop(step: Callable, state: dict[str, Any], steps: int, width: int, until_free: jax.Array
               ) -> tuple[dict[str, Any], jax.Array, jax.Array, jax.Array]:
  """Up to `steps` calls of `step(state) -> (state, (tokens_BxW, logprobs_BxW, live_BxW))`, their
  outputs side by side ([B, steps * width] each; past the last call, not live). With `until_free`,
  the chunk ends after the step in which a row finishes (or once every row is done), so the host
  refills its slot at once instead of at the chunk's end."""
  B = state["done"].shape[0]
  done_before = state["done"]

  def body(carry):
    i, state, out = carry
    state, emitted = step(state)
    return i + 1, state, tuple(jax.lax.dynamic_update_slice(o, e.reshape(B, width).astype(o.dtype), (0, i * width))
                               for o, e in zip(out, emitted))

  def more(carry):
    i, state, _ = carry
    freed = jnp.any(state["done"] & ~done_before) | jnp.all(state["done"])
    return (i < steps) & ~(until_free & freed)

  out = tuple(jnp.zeros((B, steps * width), dtype) for dtype in (jnp.int32, jnp.float32, jnp.bool_))
  _, state, out = jax.lax.while_loop(more, body, (0, state, out))
  return state, *out


def window(need: int, S: int) -> int:
  """The cache slots a decode chunk attends to: `need` (past every position it decodes) rounded up
  to a quarter of S, so a chunk reads little more of the cache than is filled, in at most four compiles."""
  quarter = -(-S // 4)
  return min(S, -(-need // quarter) * quarter)


def decode_mesh(cfg: config.ModelConfig, devices: int, *others: config.ModelConfig) -> config.MeshConfig:
  """Tensor-parallel over as many devices as the kv heads (and the other split axes) allow, the rest
  data-parallel over slots: decoding then never gathers a weight. `others`: models that share the
  mesh (a speculative draft), whose axes it must split too."""
  splits = [n for m in (cfg, *others) for n in (m.num_kv_heads, m.num_heads, m.d_ff, m.vocab_size)]
  tensor = max(t for t in range(1, devices + 1) if devices % t == 0 and all(n % t == 0 for n in splits))
  return config.MeshConfig(data=devices // tensor, fsdp=1, tensor=tensor)


def sampling_config(cfg: Config, devices: int, overrides: Sequence[str] = (), *sharing: config.ModelConfig) -> Config:
  """A run's config on the mesh it samples with: `decode_mesh` over one slice's `devices` (for the
  models `sharing` it too), then the `mesh.*` and `sample.*` overrides."""
  cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(decode_mesh(cfg.model, devices, *sharing), rules=cfg.mesh.rules),
                            sample=dataclasses.replace(cfg.sample))  # the overrides change copies, not the caller's
  config.apply_overrides(cfg, overrides, only=("mesh.", "sample."))
  return cfg


def load_params(ckpts, step: int, cfg: Config, mesh: Mesh) -> Any:
  """A checkpoint's parameters, sharded for `mesh` and cast to the compute dtype as they are read."""
  _, abstract = abstract_model(cfg.model)
  shardings = param_shardings(abstract, mesh, cfg.mesh.rules)
  dtype = jnp.dtype(cfg.model.dtype)
  targets = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype, sharding=s),
                         nnx.to_pure_dict(abstract), shardings)
  return ckpts.restore_params(step, targets)


class Sampler:
  def __init__(self, cfg: Config, params: Any, tokenizer: Tokenizer | None, mesh: Mesh, quantize: str | None = None,
               kv: str | None = None):
    """`params`: stacked as a checkpoint holds them (or another sampler's); the sampler keeps each
    layer's weights apart (see `Transformer.decode`). `quantize="int8"`: int8 weights computed from
    them (lm.quantize). `kv="int8"`: an int8 key/value cache (lm.kv_cache)."""
    kv_cache.check(kv)
    self.cfg, self.tokenizer, self.mesh, self.quantize, self.kv = cfg, tokenizer, mesh, quantize, kv
    self.speculation: Any = None  # an lm.speculative.Speculation: decode rounds of proposed tokens instead of steps
    self.rules = cfg.mesh.rules
    self.graphdef, _ = abstract_model(cfg.model, stacked=False)
    self.params = unstack(params, cfg.model, mesh, self.rules)
    self.vocab = tokenizer.vocab_size if tokenizer is not None else cfg.model.vocab_size
    if quantize:
      self.graphdef, self.params = quantized(self.params, cfg.model, mesh, self.rules, quantize, stacked=False)
    self.rows_multiple = sharding.data_parallel_size(mesh, self.rules)
    self.cache_sharding = kv_cache.entry_sharding(kv, mesh, self.rules)
    self.compiled: dict[tuple, Any] = {}
    self.timing = Timing()
    self.workdir: Path | None = None  # the run and checkpoint step, when restored from one
    self.step: int | None = None
    self.tokenizer_digest: str | None = None  # the SHA-256 the checkpoint records for its tokenizer

  @classmethod
  def from_workdir(cls, workdir: str | Path, step: int | None = None, mesh_cfg: config.MeshConfig | None = None,
                   overrides: Sequence[str] = (), quantize: str | None = None, kv: str | None = None,
                   sharing: Sequence[config.ModelConfig] = ()) -> "Sampler":
    """The newest (or the given) checkpoint of a run, restored onto this process's devices, whatever
    mesh it was trained on: `mesh_cfg` as it is, or `sampling_config`'s (`decode_mesh`, for the models
    `sharing` it too, changed by the `mesh.*` overrides; `sample.*` ones change the sampling settings)."""
    check_quantize(quantize)
    kv_cache.check(kv)
    if mesh_cfg and overrides:
      raise ValueError("from_workdir takes a mesh_cfg or overrides, not both")
    workdir = Path(workdir)
    ckpts, step, meta = open_run(workdir, step)
    cfg = config.from_dict(meta["config"])
    if mesh_cfg:
      cfg.mesh = mesh_cfg
    else:
      per_slice = jax.device_count() // sharding.slices_of(jax.devices())  # make_mesh stacks the slices along data
      cfg = sampling_config(cfg, per_slice, overrides, *sharing)
    tokenizer_path = distributed.all_or_none(run_tokenizer, workdir, step, meta)
    mesh = sharding.make_mesh(cfg.mesh)
    try:
      params = unstack(load_params(ckpts, step, cfg, mesh), cfg.model, mesh, cfg.mesh.rules, consume=True)
    finally:
      ckpts.close()
    sampler = cls(cfg, params, Tokenizer(tokenizer_path), mesh, quantize, kv)
    sampler.workdir, sampler.step, sampler.tokenizer_digest = workdir.resolve(), step, meta["tokenizer"].get("sha256")
    return sampler

  def encode(self, prompt: str) -> list[int]:
    bos = self.tokenizer.bos_id
    return ([bos] if bos >= 0 else []) + self.tokenizer.encode(prompt)

  def requests(self, prompts: Sequence[str], num_samples: int, max_new_tokens: int) -> list[Request]:
    """Every (prompt, sample) pair of a job, checked before anything runs."""
    out = []
    for i, prompt in enumerate(prompts):
      if not prompt:
        raise ConfigError(f"prompt {i} is empty")
      ids = self.encode(prompt)
      if len(ids) + max_new_tokens > self.cfg.model.max_seq_len:
        raise ConfigError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's max_seq_len={self.cfg.model.max_seq_len}")
      out += [Request(i, j, prompt, ids, max_new_tokens) for j in range(num_samples)]
    return out

  def row_sharding(self, ndim: int) -> Any:
    """Rows (the leading axis) over the data axes, the rest whole."""
    return sharding.named(self.mesh, ("batch",) + (None,) * (ndim - 1), self.rules)

  def row_struct(self, dtype, *shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self.row_sharding(len(shape)))

  def _rows(self, x: np.ndarray) -> jax.Array:
    """A batch-sharded global array from a host array that every process holds whole."""
    return jax.make_array_from_callback(x.shape, self.row_sharding(x.ndim), lambda index: x[index])

  # Device state: each layer's keys and values plus, per slot, the token its next step feeds (the
  # prompt's last, then the last drawn) and that token's position, how many tokens the row has drawn,
  # its budget, whether it is done, its key.
  def abstract_state(self, B: int, S: int) -> dict[str, Any]:
    m = self.cfg.model
    kv = kv_cache.abstract_entry(self.kv, (B, m.num_kv_heads, S, config.head_dim(m)), jnp.dtype(m.dtype), self.cache_sharding)
    row = lambda dtype, *shape: self.row_struct(dtype, B, *shape)
    key_words = jax.random.key_data(jax.random.key(0)).shape[-1]
    state = {"cache": ((kv, kv),) * m.num_layers, "token": row(jnp.int32), "pos": row(jnp.int32),
             "count": row(jnp.int32), "budget": row(jnp.int32), "done": row(jnp.bool_), "key": row(jnp.uint32, key_words)}
    return state | (self.speculation.abstract_state(self, B, S) if self.speculation else {})

  def prefill(self, params, cache, tokens_RxP, lengths_R, slots_R) -> tuple[tuple[kv_cache.Entry, kv_cache.Entry], ...]:
    """The cache with the keys and values of each row's first `lengths_R` tokens written into rows
    `slots_R` (ids past the last row: padding prompts, dropped)."""
    R, P = tokens_RxP.shape
    model = nnx.merge(self.graphdef, params)
    segments = (jnp.arange(P)[None] < lengths_R[:, None]).astype(jnp.int32)
    with sharding.activation_rules(self.mesh, self.rules):
      kv = model.prefill(tokens_RxP, segments, jnp.broadcast_to(jnp.arange(P), (R, P)))
    write = lambda c, new_RxPxKxH: kv_cache.write(c, (slots_R, slice(None), slice(0, P)), new_RxPxKxH.swapaxes(1, 2))
    return tuple(tuple(jax.lax.with_sharding_constraint(write(c, new), self.cache_sharding) for c, new in zip(*layer))
                 for layer in zip(cache, kv))

  def empty_state(self, B: int, S: int) -> dict[str, Any]:
    """Every slot free (done), allocated in place with its sharding."""
    abstract = self.abstract_state(B, S)
    make = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract) | {"done": jnp.ones((B,), bool)}
    if ("empty", B, S) not in self.compiled:
      self.compiled["empty", B, S] = jax.jit(make, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))
    return self.compiled["empty", B, S]()

  def _insert_fn(self, params, state, tokens_RxP, lengths_R, last_R, budget_R, slots_R, index_R, sample_R, seed_key):
    """Writes R prompts (the job's `index_R`, samples `sample_R`) into slots `slots_R` (ids past the
    last slot: padding rows): the first `lengths_R` tokens prefilled, the last, `last_R`, left for
    the row's first decode step."""
    cache = self.prefill(params, state["cache"], tokens_RxP, lengths_R, slots_R)
    seed = jax.random.wrap_key_data(seed_key)
    keys_R = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(seed, i), j))(index_R, sample_R)
    put = lambda a, x: a.at[slots_R].set(x.astype(a.dtype), mode="drop")
    return state | {"cache": cache, "token": put(state["token"], last_R),
                    "pos": put(state["pos"], lengths_R), "count": put(state["count"], jnp.zeros_like(lengths_R)),
                    "budget": put(state["budget"], budget_R), "done": put(state["done"], jnp.zeros_like(lengths_R, bool)),
                    "key": put(state["key"], jax.random.key_data(keys_R))}

  def _decode_fn(self, params, state, temperature, top_k, top_p, stop_ids, until_free, steps, window):
    """Up to `steps` decode steps for every slot (`chunk_loop`), attending to the first `window` cache
    slots: each feeds the row's token and emits the token it draws, its log-probability and whether
    it belongs to a live row. Done rows compute along but stand still."""
    model = nnx.merge(self.graphdef, params)

    def step(state):
      token, pos, count = state["token"], state["pos"], state["count"]
      with sharding.activation_rules(self.mesh, self.rules):
        logits, cache = model.decode(token[:, None], pos[:, None], state["cache"], window)
      keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state["key"]), count)
      drawn, logprob = choose(keys, logits[:, 0], temperature, top_k, top_p, self.vocab)
      live = ~state["done"]
      done = state["done"] | jnp.any(drawn[:, None] == stop_ids[None], axis=-1) | (count + 1 >= state["budget"])
      go = ~done
      state = state | {"cache": cache, "token": jnp.where(go, drawn, token), "pos": jnp.where(go, pos + 1, pos),
                       "count": jnp.where(go, count + 1, count), "done": done}
      return state, (drawn, logprob, live)

    return chunk_loop(step, state, steps, 1, until_free)

  def _compile(self, key: tuple, fn, *args, **static) -> Any:
    if key not in self.compiled:
      start = time.perf_counter()
      self.compiled[key] = jax.jit(fn, static_argnames=tuple(static), donate_argnums=1).lower(*args, **static).compile()
      self.timing.compile_seconds += time.perf_counter() - start
    return self.compiled[key]

  def _abstract(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

  def _knob_shapes(self) -> tuple:
    return tuple(jax.ShapeDtypeStruct((), d) for d in (jnp.float32, jnp.int32, jnp.float32))

  def _seed_shape(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(Knobs().seed_key().shape, jnp.uint32)

  def insert_function(self, B: int, S: int, R: int, P: int) -> Any:
    """Compiled insert of R prompts whose prefills (all but their last tokens) fit a P-token bucket
    into a state of B slots of S positions."""
    row = lambda dtype, *shape: self.row_struct(dtype, R, *shape)
    state = self.abstract_state(B, S)
    return self._compile(("insert", B, S, R, P), self._insert_fn, self._abstract(self.params), state,
                         row(jnp.int32, P), *[row(jnp.int32)] * 6, self._seed_shape())

  def decode_function(self, B: int, S: int, steps: int, window: int | None = None) -> Any:
    """Compiled chunk of up to `steps` decode steps over B slots of S positions, attending to the first
    `window` (default all S)."""
    window = window or S
    return self._compile(("decode", B, S, steps, window), self._decode_fn, self._abstract(self.params),
                         self.abstract_state(B, S), *self._knob_shapes(), *self.chunk_shapes(), steps=steps, window=window)

  def chunk_shapes(self) -> tuple[jax.ShapeDtypeStruct, ...]:
    """A decode chunk's stop ids and its `until_free` switch."""
    return jax.ShapeDtypeStruct((MAX_STOP_TOKENS,), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_)

  def run(self, requests: Iterable[Request], knobs: Knobs, *, batch_size: int = 16, chunk: int | None = None,
          stop_tokens: Sequence[int] = (), logprobs: bool = False, static: int = 0,
          check: Callable[[], None] | None = None) -> Iterator[Completion]:
    """Completions in the order they finish. `static` > 0 batches as a fixed-batch sampler does (the
    benchmark's baseline): new prompts enter only when every slot is free, and each batch runs
    `static` decode steps (its max_new_tokens) however early its rows stop. `chunk`: the most decode
    steps per compiled call (one ends early when a row finishes), by default the config's `sample.chunk`. `check`: called after each chunk's
    completions on every process; a ConfigError it raises on any stops them all."""
    if batch_size < 1:
      raise ConfigError(f"batch_size={batch_size} must be at least 1")
    stops = self.stops(stop_tokens)
    waiting = collections.deque(requests)
    if not waiting:
      return
    chunk = min(chunk or self.cfg.sample.chunk, max(r.budget for r in waiting))  # a step or round emits a token at least
    stop_ids = jnp.asarray(stops + [-1] * (MAX_STOP_TOKENS - len(stops)), jnp.int32)
    # No more slots than requests: a slot with nothing in it still costs its share of every step.
    B = -(-min(batch_size, len(waiting)) // self.rows_multiple) * self.rows_multiple
    S = bucket(max(len(r.ids) + r.budget for r in waiting), self.cfg.model.max_seq_len)
    advance = chunk * (self.speculation.k + 1 if self.speculation else 1)  # the most a row moves in a chunk
    state = self.empty_state(B, S)
    knob_arrays, seed_key = knobs.arrays(), knobs.seed_key()  # once: each array made costs a dispatch
    until_free = jnp.bool_(not static)
    slots: list[Slot | None] = [None] * B
    steps_in_batch = 0
    while waiting or any(slots):
      free = [s for s, slot in enumerate(slots) if slot is None]
      if waiting and free and (not static or len(free) == B):
        batch = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        state = self._insert(state, batch, free, seed_key, B, S)
        for s, request in zip(free, batch):
          slots[s] = Slot(request)
        steps_in_batch = 0
      # A live row's next step feeds the token at position len(prompt) - 1 + tokens taken.
      need = max((len(s.request.ids) - 1 + len(s.token_ids) for s in slots if s and not s.finished), default=0) + advance
      if self.speculation:
        decode = self.speculation.decode_function(self, B, S, chunk, window(need, S))
      else:
        decode = self.decode_function(B, S, chunk, window(need, S))
      start, compiling = time.perf_counter(), self.timing.compile_seconds
      state, ids, lps, live = decode(self.params, state, *knob_arrays, stop_ids, until_free)
      ids, lps, live = self._gather(ids, lps, live)
      self.timing.decode_seconds += time.perf_counter() - start - (self.timing.compile_seconds - compiling)
      if self.speculation:
        self.speculation.tally(self.timing, live)
      steps_in_batch += chunk
      for s, slot in enumerate(slots):
        if slot is None:
          continue
        if not slot.finished and (reason := self._take(slot, ids[s][live[s]], lps[s][live[s]], stops)):
          slot.finished = True
          yield self._completion(slot, reason, logprobs)
        if slot.finished and steps_in_batch >= static:  # static: the batch frees its slots together
          slots[s] = None
      if check is not None:
        distributed.all_or_none(check)

  def stops(self, stop_tokens: Sequence[int]) -> list[int]:
    """The token ids a row stops at: `stop_tokens` and end-of-sequence."""
    if bad := [t for t in stop_tokens if not 0 <= t < self.vocab]:
      raise ConfigError(f"stop token {bad[0]} is not a token id of this vocabulary (0 to {self.vocab - 1})")
    stops = sorted({*stop_tokens, self.tokenizer.eos_id if self.tokenizer else -1} - {-1})
    if len(stops) > MAX_STOP_TOKENS:
      raise ConfigError(f"{len(stops)} stop tokens (end-of-sequence included); at most {MAX_STOP_TOKENS} are supported")
    return stops

  def _gather(self, *rows: jax.Array) -> tuple[np.ndarray, ...]:
    """Every process's rows, whole on each host. Across processes the first gather of each shape compiles
    a collective: that call is timed as compile."""
    key = ("gather", *(r.shape for r in rows))
    if jax.process_count() == 1 or key in self.compiled:
      return multihost_utils.process_allgather(rows, tiled=True)
    jax.block_until_ready(rows)
    start = time.perf_counter()
    gathered = multihost_utils.process_allgather(rows, tiled=True)
    self.compiled[key] = None
    self.timing.compile_seconds += time.perf_counter() - start
    return gathered

  def _insert(self, state, batch: list[Request], free: list[int], seed_key: jax.Array, B: int, S: int):
    """Prefills `batch` into slots `free`, shortest prompts first, the prompts of one bucket together
    (`prefill_rows` at a time): no prompt pads to a longer one's bucket."""
    start, compiling = time.perf_counter(), self.timing.compile_seconds
    pairs = sorted(zip(batch, free), key=lambda pair: len(pair[0].ids))
    done = 0
    while done < len(pairs):
      P = prompt_bucket(len(pairs[done][0].ids) - 1, S)
      same = sum(prompt_bucket(len(r.ids) - 1, S) == P for r, _ in pairs[done:])  # a run, as they are sorted
      R = prefill_rows(same, self.rows_multiple)
      n = min(R, same)
      state = self._prefill_rows(state, pairs[done:done + n], R, P, seed_key, B, S)
      done += n
    state = jax.block_until_ready(state)
    self.timing.prefill_seconds += time.perf_counter() - start - (self.timing.compile_seconds - compiling)
    return state

  def _prefill_rows(self, state, pairs: list[tuple[Request, int]], R: int, P: int, seed_key: jax.Array, B: int, S: int):
    """One compiled insert of `pairs` (request, slot), their prefills padded to R rows of P tokens."""
    tokens = np.zeros((R, P), np.int32)
    lengths, last, budgets, index, sample = (np.zeros((R,), np.int32) for _ in range(5))
    slots = np.full((R,), B, np.int32)  # past the last slot: dropped
    for r, (request, slot) in enumerate(pairs):
      *head, last[r] = request.ids
      tokens[r, :len(head)] = head
      lengths[r], budgets[r], slots[r], index[r], sample[r] = len(head), request.budget, slot, request.index, request.sample
    insert = self.insert_function(B, S, R, P)
    state = insert(self.params, state, *map(self._rows, (tokens, lengths, last, budgets, slots, index, sample)), seed_key)
    if self.speculation:
      state = self.speculation.insert(self, state, *map(self._rows, (tokens, lengths, slots)))
    self.timing.prefill_tokens += int(lengths[:len(pairs)].sum())
    return state

  def _take(self, slot: Slot, ids: np.ndarray, lps: np.ndarray, stops: list[int]) -> str | None:
    """Appends a chunk's live tokens to a slot; "stop" or "length" when the row ended."""
    for token, logprob in zip(ids.tolist(), lps.tolist()):
      if token in stops:
        return "stop"
      slot.token_ids.append(token)
      slot.logprobs.append(logprob)
      self.timing.decode_tokens += 1
      if len(slot.token_ids) == slot.request.budget:
        return "length"
    return None

  def _completion(self, slot: Slot, reason: str, logprobs: bool) -> Completion:
    r = slot.request
    text = self.tokenizer.decode(slot.token_ids) if self.tokenizer else ""
    return Completion(prompt=r.prompt, text=text, token_ids=slot.token_ids, finish_reason=reason,
                      logprobs=slot.logprobs if logprobs else None, index=r.index, sample=r.sample)

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
               batch_size: int = 16, chunk: int | None = None, logprobs: bool = False, stop_tokens: Sequence[int] = ()
               ) -> list[Completion]:
    """`num_samples` completions per prompt, in prompt order. Sample j of prompt i draws from its own
    key (seed, i, j), so it does not depend on batching."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples, seed)
    requests = self.requests(prompts, num_samples, max_new_tokens)
    knobs = Knobs(temperature, top_k, top_p, seed)
    return sorted(self.run(requests, knobs, batch_size=batch_size, chunk=chunk, stop_tokens=stop_tokens,
                           logprobs=logprobs), key=lambda c: (c.index, c.sample))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, num_samples: int,
                   seed: int = 0) -> None:
  checks = [
      (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be at least 1"),
      (0 <= temperature < float("inf"), f"temperature={temperature} must be a finite number >= 0 (0 is greedy)"),
      (0 <= top_k < 2**31, f"top_k={top_k} must be in [0, 2**31) (0, or the vocabulary size or more, keeps every token)"),
      (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]"),
      (num_samples >= 1, f"num_samples={num_samples} must be at least 1"),
      (0 <= seed < 2**32, f"seed={seed} must be in [0, 2**32): JAX keeps 32 bits of it, so others would repeat those"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def generate(model_or_checkpoint: Sampler | str | Path, prompts: Sequence[str], **kwargs: Any) -> list[Completion]:
  """Samples from a `Sampler` or from a work directory's newest checkpoint; see `Sampler.generate`."""
  sampler = model_or_checkpoint if isinstance(model_or_checkpoint, Sampler) else Sampler.from_workdir(model_or_checkpoint)
  return sampler.generate(prompts, **kwargs)
