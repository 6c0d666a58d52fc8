"""Speculative decoding: a cheap proposer guesses K tokens, the target scores all K+1 positions in one pass.

A round, one compiled function over every slot: the proposer guesses K tokens after the row's
last token (the prompt's, or the last emitted); the target decodes that token and the K guesses at
once (T=K+1); the standard speculative-sampling rule keeps the longest accepted prefix and draws one
more token from the target (its own next token when greedy). Rows accept different counts, so each
keeps its own position; cache slots written for rejected guesses are overwritten by later rounds.

It plugs into the engine (`lm.sampler.Sampler`) through `sampler.speculation`: the engine adds
`abstract_state` to its state, calls `insert` after its own prefill, runs `decode_function` chunks
in place of its decode steps (same inputs and outputs: K+1 token places per round, the kept guesses
and the token after them live) and `tally`s the acceptance.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import config, sharding
from lm.checkpoint import open_run, run_step
from lm.config import ConfigError
from lm.sampler import Sampler, Timing, chunk_loop, scaled_logits


def probabilities(logits_BxTxV: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """The distribution `choose` draws from at each position: one-hot on the argmax when greedy."""
  B, T, V = logits_BxTxV.shape
  flat = logits_BxTxV.reshape(B * T, V).astype(jnp.float32)
  greedy = lambda: jax.nn.one_hot(jnp.argmax(flat, axis=-1), V, dtype=jnp.float32)
  sampled = lambda: jax.nn.softmax(scaled_logits(flat, temperature, top_k, top_p), axis=-1)
  return jax.lax.cond(temperature == 0, greedy, sampled).reshape(B, T, V)


def accepts(u_BxK: jax.Array, p_BxK: jax.Array, q_BxK: jax.Array) -> jax.Array:
  """A guess drawn from q is kept with probability min(1, p/q)."""
  return u_BxK * q_BxK < p_BxK


def accept(key_u_B: jax.Array, key_r_B: jax.Array, p_BxTxV: jax.Array, q_BxKxV: jax.Array,
           drafts_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """How many guesses each row keeps (the leading accepted ones), and the token after them: drawn
  from the normalised max(0, p - q) at the first rejection, from p when all K were kept. Greedy
  (one-hot p and q) keeps the longest prefix agreeing with the target and adds the target's token."""
  B, K = drafts_BxK.shape
  at = lambda x_BxKxV, i_BxK: jnp.take_along_axis(x_BxKxV, i_BxK[..., None], axis=-1)[..., 0]
  u_BxK = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(key_u_B)
  ok_BxK = accepts(u_BxK, at(p_BxTxV[:, :K], drafts_BxK), at(q_BxKxV, drafts_BxK))
  kept_B = jnp.sum(jnp.cumprod(ok_BxK.astype(jnp.int32), axis=1), axis=1)
  p_BxV = jnp.take_along_axis(p_BxTxV, kept_B[:, None, None], axis=1)[:, 0]
  q_BxV = jnp.take_along_axis(q_BxKxV, jnp.minimum(kept_B, K - 1)[:, None, None], axis=1)[:, 0]
  return kept_B, jax.vmap(jax.random.categorical)(key_r_B, jnp.log(residual(p_BxV, q_BxV, kept_B < K)))


def residual(p_BxV: jax.Array, q_BxV: jax.Array, rejected_B: jax.Array) -> jax.Array:
  """What the token after the kept guesses is drawn from: max(0, p - q) after a rejection (normalised
  by the draw), p itself after none (or where p <= q everywhere)."""
  residual_BxV = jnp.maximum(p_BxV - jnp.where(rejected_B[:, None], q_BxV, 0.0), 0.0)
  return jnp.where(jnp.sum(residual_BxV, axis=-1, keepdims=True) > 0, residual_BxV, p_BxV)


class Ngram:
  """Prompt lookup: the K tokens that followed the most recent earlier occurrence of the row's last
  n tokens (n from 3 down to 1) in its prompt and generated text, kept in a per-row history; where
  they run past the row's end, the guesses so far continue the text."""
  name = "ngram"

  def __init__(self):
    self.params: dict = {}  # no weights

  def abstract_state(self, target: Sampler, B: int, S: int) -> dict[str, Any]:
    return {"history": target.row_struct(jnp.int32, B, S)}

  def insert(self, target: Sampler, params, state, tokens_RxP, lengths_R, slots_R):
    R, P = tokens_RxP.shape
    S = state["history"].shape[1]
    rows_RxS = jnp.zeros((R, S), jnp.int32).at[:, :P].set(tokens_RxP)
    last_R = jnp.take(state["token"], slots_R, mode="fill", fill_value=0)  # the prompt's last, not prefilled
    rows_RxS = rows_RxS.at[jnp.arange(R), lengths_R].set(last_R, mode="drop")
    return state | {"history": state["history"].at[slots_R].set(rows_RxS, mode="drop")}

  def propose(self, target: Sampler, params, state, keys_B, K: int, knobs, window: int) -> tuple[jax.Array, jax.Array, Any]:
    """`window` is the draft model's (no cache here)."""
    history_BxS, pos_B = state["history"], state["pos"]  # the row's last token sits at pos
    S = history_BxS.shape[1]
    j_S = jnp.arange(S)
    match_BxS = j_S[None] < pos_B[:, None]  # an occurrence ending at j, before the row's end
    found_B = jnp.full(pos_B.shape, -1)
    for n in range(3):  # n+1 tokens; a longer match wins
      last_B = jnp.take_along_axis(history_BxS, jnp.maximum(pos_B - n, 0)[:, None], axis=1)
      match_BxS &= (j_S[None] >= n) & (pos_B[:, None] >= n) & (jnp.roll(history_BxS, n, axis=1) == last_B)
      latest_B = jnp.max(jnp.where(match_BxS, j_S[None], -1), axis=1)
      found_B = jnp.where(latest_B >= 0, latest_B, found_B)
    # What follows an occurrence ending at j runs into the guesses themselves past the row's end at
    # pos: the text repeats with period pos - j (a loop, or a quote of what was just written).
    period_B = jnp.maximum(pos_B - found_B, 1)
    follow_BxK = found_B[:, None] + 1 + jnp.arange(K)[None] % period_B[:, None]
    drafts_BxK = jnp.take_along_axis(history_BxS, jnp.clip(follow_BxK, 0, S - 1), axis=1)
    return drafts_BxK, jax.nn.one_hot(drafts_BxK, target.vocab, dtype=jnp.float32), state

  def record(self, state, tokens_BxT, pos_B):
    slots_BxT = pos_B[:, None] + jnp.arange(tokens_BxT.shape[1])
    write = lambda history_S, slots_T, tokens_T: history_S.at[slots_T].set(tokens_T, mode="drop")
    return state | {"history": jax.vmap(write)(state["history"], slots_BxT, tokens_BxT)}  # rows stay on their devices


class Draft:
  """A smaller model on the same tokenizer, with its own cache in the engine state: prefilled at
  insert, it decodes the row's last token and its own K guesses each round (K+1 steps, so the last
  guess is in its cache should every guess be kept)."""
  name = "draft"

  def __init__(self, draft: Sampler):
    self.draft = draft
    self.params = draft.params

  def abstract_state(self, target: Sampler, B: int, S: int) -> dict[str, Any]:
    return {"draft_cache": self.draft.abstract_state(B, S)["cache"]}

  def insert(self, target: Sampler, params, state, tokens_RxP, lengths_R, slots_R):
    return state | {"draft_cache": self.draft.prefill(params, state["draft_cache"], tokens_RxP, lengths_R, slots_R)}

  def propose(self, target: Sampler, params, state, keys_B, K: int, knobs, window: int) -> tuple[jax.Array, jax.Array, Any]:
    model = nnx.merge(self.draft.graphdef, params)

    def step(carry, keys_B):
      cache, token_B, pos_B = carry
      with sharding.activation_rules(self.draft.mesh, self.draft.rules):
        logits, cache = model.decode(token_B[:, None], pos_B[:, None], cache, window)
      q_BxV = probabilities(logits[:, :, :target.vocab], *knobs)[:, 0]
      drawn_B = jax.vmap(jax.random.categorical)(keys_B, jnp.log(q_BxV))
      return (cache, drawn_B, pos_B + 1), (drawn_B, q_BxV)

    keys_K1xB = jax.vmap(lambda k: jax.random.split(k, K + 1), out_axes=1)(keys_B)
    (cache, _, _), (drafts_K1xB, q_K1xBxV) = jax.lax.scan(step, (state["draft_cache"], state["token"], state["pos"]), keys_K1xB)
    return drafts_K1xB[:K].T, jnp.swapaxes(q_K1xBxV[:K], 0, 1), state | {"draft_cache": cache}

  def record(self, state, tokens_BxT, pos_B):
    return state


@dataclasses.dataclass
class Speculation:
  proposer: Ngram | Draft
  k: int  # guesses per round

  def abstract_state(self, target: Sampler, B: int, S: int) -> dict[str, Any]:
    return self.proposer.abstract_state(target, B, S)

  def insert(self, target: Sampler, state, tokens_RxP, lengths_R, slots_R):
    """After the engine's prefill of the same prompts into rows `slots_R`."""
    B, S, (R, P) = state["token"].shape[0], target_len(state), tokens_RxP.shape
    insert = target._compile(("speculate-insert", self.proposer.name, B, S, R, P), functools.partial(self.proposer.insert, target),
                             target._abstract(self.proposer.params), target._abstract(state),
                             *map(target._abstract, (tokens_RxP, lengths_R, slots_R)))
    return insert(self.proposer.params, state, tokens_RxP, lengths_R, slots_R)

  def _round_fn(self, target: Sampler, params, state, draft_params, temperature, top_k, top_p, stop_ids, until_free,
                rounds, window):
    """Up to `rounds` rounds for every slot (`chunk_loop`), attending to the first `window` cache slots;
    emits K+1 token places per round (the kept guesses, then the target's token), live where the row
    is live and the place is filled. Done rows compute along but stand still."""
    model = nnx.merge(target.graphdef, params)
    K = self.k
    knobs = (temperature, top_k, top_p)

    def one(state):
      token_B, pos_B, count_B, done_B = state["token"], state["pos"], state["count"], state["done"]
      keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state["key"]), count_B)
      keys_3xB = jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(keys_B)
      drafts_BxK, q_BxKxV, state = self.proposer.propose(target, draft_params, state, keys_3xB[0], K, knobs, window)
      tokens_BxT = jnp.concatenate([token_B[:, None], drafts_BxK], axis=1)
      positions_BxT = pos_B[:, None] + jnp.arange(K + 1)
      with sharding.activation_rules(target.mesh, target.rules):
        logits, cache = model.decode(tokens_BxT, positions_BxT, state["cache"], window)
      logits_BxTxV = logits[..., :target.vocab].astype(jnp.float32)
      kept_B, next_B = accept(keys_3xB[1], keys_3xB[2], probabilities(logits_BxTxV, *knobs), q_BxKxV, drafts_BxK)
      emitted_BxT = jnp.where(jnp.arange(K + 1)[None] == kept_B[:, None], next_B[:, None], jnp.pad(drafts_BxK, ((0, 0), (0, 1))))
      logprob_BxT = jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV, axis=-1), emitted_BxT[..., None], axis=-1)[..., 0]
      live_BxT = ~done_B[:, None] & (jnp.arange(K + 1)[None] <= kept_B[:, None])
      stopped_B = jnp.any(live_BxT & jnp.any(emitted_BxT[..., None] == stop_ids, axis=-1), axis=-1)
      n_B = kept_B + 1
      done = done_B | stopped_B | (count_B + n_B >= state["budget"])
      go = ~done
      state = self.proposer.record(state, jnp.concatenate([token_B[:, None], emitted_BxT], axis=1), pos_B)
      state = state | {"cache": cache, "token": jnp.where(go, next_B, token_B),
                       "pos": jnp.where(go, pos_B + n_B, pos_B), "count": jnp.where(go, count_B + n_B, count_B), "done": done}
      return state, (emitted_BxT, logprob_BxT, live_BxT)

    return chunk_loop(one, state, rounds, K + 1, until_free)

  def decode_function(self, target: Sampler, B: int, S: int, rounds: int, window: int | None = None):
    """Compiled chunk of up to `rounds` rounds, called as the engine calls its decode chunk."""
    window = window or S
    compiled = target._compile(("speculate", self.proposer.name, self.k, B, S, rounds, window),
                               functools.partial(self._round_fn, target),
                               target._abstract(target.params), target.abstract_state(B, S),
                               target._abstract(self.proposer.params), *target._knob_shapes(), *target.chunk_shapes(),
                               rounds=rounds, window=window)
    return lambda params, state, *rest: compiled(params, state, self.proposer.params, *rest)

  def tally(self, timing: Timing, live_BxN: np.ndarray) -> None:
    live = np.asarray(live_BxN).reshape(live_BxN.shape[0], -1, self.k + 1)
    timing.target_passes += int(live[..., 0].sum())
    timing.proposed += self.k * int(live[..., 0].sum())
    timing.accepted += int(live[..., 1:].sum())


def target_len(state) -> int:
  return state["cache"][0][0].shape[2]


def draft_model(spec: str) -> config.ModelConfig:
  """The draft's model, which the target's decode mesh must also split."""
  try:
    ckpts, _, meta = open_run(*run_step(spec))
  except ConfigError as e:
    raise ConfigError(f"--draft: {e}") from None
  ckpts.close()
  return config.from_dict(meta["config"]).model


def load_draft(target: Sampler, spec: str) -> Draft:
  """`--draft DIR[:STEP]`: a run restored onto the target's mesh, trained with the target's tokenizer, with
  the target's int8 weights or cache where it has them."""
  workdir, step = run_step(spec)
  draft = Sampler.from_workdir(workdir, step, mesh_cfg=target.cfg.mesh, quantize=target.quantize, kv=target.kv)
  if draft.tokenizer_digest != target.tokenizer_digest:
    raise ConfigError(f"--draft '{workdir}' was trained with tokenizer SHA-256 {str(draft.tokenizer_digest)[:12]}..., "
                      f"the target with {str(target.tokenizer_digest)[:12]}...; a draft must share the target's tokenizer")
  return Draft(draft)


def speculate(target: Sampler, proposer: Ngram | Draft, k: int) -> None:
  """Makes `target` decode speculatively with `proposer` guessing `k` tokens a round."""
  if not 1 <= k < target.cfg.model.max_seq_len:
    raise ConfigError(f"--draft-tokens={k} must be at least 1 and less than the model's max_seq_len={target.cfg.model.max_seq_len}")
  target.speculation = Speculation(proposer, k)
  target.compiled.clear()  # the engine state gains the proposer's: functions compiled without it no longer fit
