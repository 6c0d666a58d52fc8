"""The KV-cached sampler against a naive decoder that recomputes the whole sequence every step."""

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config, convert, jobs, sharding, speculative
from lm.config import ConfigError
from lm.model import Transformer
from lm.params import abstract_model, param_shardings, unstack
from lm.sampler import Knobs, Request, Sampler, choose, decode_mesh, prompt_bucket, window
from tests.conftest import ROOT, run_trainer, stacked, tiny_overrides


def make_sampler(tokenizer, devices=None, mesh=("mesh.data=1", "mesh.fsdp=1")):
  """A random model with peaked logits (so greedy choices are far from ties)."""
  cfg = config.load(None, tiny_overrides(**{"model.vocab_size": tokenizer.vocab_size, "model.init_std": 0.3}) + list(mesh))
  mesh = sharding.make_mesh(cfg.mesh, devices or jax.devices()[:1])
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0))))
  params = jax.device_put(params, param_shardings(abstract_model(cfg.model)[1], mesh, cfg.mesh.rules))
  return Sampler(cfg, params, tokenizer, mesh)


def naive_greedy(cfg, params, ids, n):
  """Recomputes the whole sequence for every new token, with the blocks stacked and scanned as in
  training (the sampler lists them); stops after an end-of-sequence token."""
  params = stacked(params)
  graphdef = abstract_model(cfg.model)[0]
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])
  seq = np.zeros((1, len(ids) + n), np.int32)  # one shape; causality makes the zeros after `end` inert
  seq[0, :len(ids)] = ids
  for end in range(len(ids), len(ids) + n):
    seq[0, end] = int(jnp.argmax(forward(params, seq)[end - 1]))
  return seq[0, len(ids):].tolist()


def until_eos(ids, eos):
  return ids[:ids.index(eos)] if eos in ids else ids


PROMPTS = ["def main(argv):\n    ", "import os", "class Tree:\n    def __init__(self, left, right):\n        self.left = left"]


def test_greedy_equals_naive_decoder_token_for_token(tokenizer):
  sampler = make_sampler(tokenizer)
  out = sampler.generate(PROMPTS, max_new_tokens=12, stop_tokens=())
  for prompt, completion in zip(PROMPTS, out):
    want = naive_greedy(sampler.cfg, sampler.params, sampler.encode(prompt), 12)
    assert completion.token_ids == until_eos(want, tokenizer.eos_id)


def test_the_default_decode_mesh_of_eight_devices_equals_the_naive_decoder_on_one(tokenizer):
  """Tensor-parallel over the kv heads and data-parallel over slots, with more prompts than slots."""
  one = make_sampler(tokenizer)
  mesh = decode_mesh(one.cfg.model, 8)
  eight = make_sampler(tokenizer, jax.devices(), [f"mesh.{k}={getattr(mesh, k)}" for k in ("data", "fsdp", "tensor")])
  assert dict(eight.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  got = eight.generate(JOB, max_new_tokens=8, batch_size=4, stop_tokens=())
  for prompt, completion in zip(JOB, got):
    assert completion.token_ids == until_eos(naive_greedy(one.cfg, one.params, one.encode(prompt), 8), tokenizer.eos_id)


def test_every_cached_decode_step_matches_the_full_forward_pass(tokenizer):
  sampler = make_sampler(tokenizer)
  model = nnx.merge(sampler.graphdef, sampler.params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, tokenizer.vocab_size, (2, 20)), jnp.int32)
  full = model(tokens)
  prompt, S = 8, 20
  kv = model.prefill(tokens[:, :prompt], jnp.ones((2, prompt), jnp.int32), jnp.tile(jnp.arange(prompt), (2, 1)))
  pad = [(0, 0), (0, 0), (0, S - prompt), (0, 0)]  # a layer's cache is [B, kv_heads, S, head_dim]
  cache = tuple(tuple(jnp.pad(c.swapaxes(1, 2), pad) for c in layer) for layer in kv)
  for t in range(prompt, S):
    window = t + 1 if t % 2 else None  # the fewest slots that hold position t, or all of them
    logits, cache = model.decode(tokens[:, t:t + 1], jnp.full((2, 1), t), cache, window)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4)


pick = jax.jit(choose, static_argnames="vocab")  # eager, every call would trace and compile its branches anew


def naive_sample(forward, params, ids, n, key, temperature, top_p, vocab):
  """Token t drawn with key fold_in(key, t) from a full forward pass over everything before it."""
  seq = np.zeros((1, 64), np.int32)  # one shape for every prompt; causality makes the zeros inert
  seq[0, :len(ids)] = ids
  for end in range(len(ids), len(ids) + n):
    token, _ = pick(jax.random.fold_in(key, end - len(ids))[None], forward(params, seq)[end - 1][None],
                      jnp.float32(temperature), jnp.int32(0), jnp.float32(top_p), vocab)
    seq[0, end] = int(token[0])
  return seq[0, len(ids):len(ids) + n].tolist()


def until_stop(ids, stops):
  return next((ids[:n] for n, t in enumerate(ids) if t in stops), ids)


JOB = PROMPTS[:2] + ["x = 1", "for i in range(10):", "return", "# comment\n", "print(", "y", "z = f(a, b)"]  # one bucket


def test_continuous_batching_equals_the_naive_decoder_token_for_token(tokenizer):
  """Greedy and seeded top-p; more prompts than slots, rows stopping at different points; two slot
  counts by two chunk lengths, and static batches."""
  sampler = make_sampler(tokenizer)
  graphdef = abstract_model(sampler.cfg.model)[0]
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])
  params = stacked(sampler.params)
  n = 10
  for knobs in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=5)):
    want = []
    for i, prompt in enumerate(JOB):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(knobs.get("seed", 0)), i), 0)
      want.append(naive_sample(forward, params, sampler.encode(prompt), n, key, knobs["temperature"],
                               knobs.get("top_p", 1.0), tokenizer.vocab_size))
    stops = {want[0][3], want[1][6], want[2][1], tokenizer.eos_id}  # rows end at different points
    want = [until_stop(w, stops) for w in want]
    assert len({len(w) for w in want}) > 2
    for batch_size, chunk, static in [(2, 4, 0), (2, 7, 0), (4, 4, 0), (4, 7, 0), (4, 7, n)]:
      sampler.timing = type(sampler.timing)()
      got = list(sampler.run(sampler.requests(JOB, 1, n), Knobs(**knobs), batch_size=batch_size, chunk=chunk,
                             stop_tokens=sorted(stops), static=static))
      got.sort(key=lambda c: c.index)
      assert [c.token_ids for c in got] == want, (knobs, batch_size, chunk, static)
      assert [c.finish_reason for c in got] == ["length" if len(w) == n else "stop" for w in want]
      assert sampler.timing.decode_tokens == sum(map(len, want))  # kept tokens only


def test_a_slot_freed_mid_chunk_takes_the_next_prompt_at_once(tokenizer):
  """Two slots, chunk 16: the chunk ends after the step in which the first row finishes, so the third
  starts then, not 16 steps in. The first prompt is one token: nothing to prefill."""
  sampler = make_sampler(tokenizer)
  ids = [sampler.encode(PROMPTS[0])[:1], sampler.encode(PROMPTS[0]), sampler.encode(PROMPTS[1])]
  requests = [Request(i, 0, "", row, budget) for i, (row, budget) in enumerate(zip(ids, (3, 16, 16)))]
  steps, decode_function = [], sampler.decode_function

  def counted(*args, **kwargs):
    chunk = decode_function(*args, **kwargs)

    def run(*inputs):
      out = chunk(*inputs)
      steps.append(int(np.asarray(out[3]).any(axis=0).sum()))  # steps with a live row
      return out
    return run

  sampler.decode_function = counted
  got = sorted(sampler.run(requests, Knobs(), batch_size=2, chunk=16), key=lambda c: c.index)
  for r, c in zip(requests, got):
    assert c.token_ids == until_eos(naive_greedy(sampler.cfg, sampler.params, r.ids, r.budget), tokenizer.eos_id)
  first, second, third = (len(c.token_ids) + (c.finish_reason == "stop") for c in got)  # a stop token takes a step
  assert first < 16 and sum(steps) == max(second, first + third) < max(second, 16 + third)
  # A chunk longer than any budget runs as one of the largest budget (2**31 steps overflowed, and
  # 10**9 allocated [slots, chunk] outputs).
  assert [c.token_ids for c in sampler.run(requests[:1], Knobs(), chunk=3_000_000_000)] == [got[0].token_ids]


def test_unstack_gives_each_layer_its_own_weights_and_lets_go_of_the_stacked_ones():
  cfg = config.load(None, tiny_overrides(**{"model.num_layers": 3}) + ["mesh.data=1", "mesh.fsdp=1"])
  want = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0)))))
  params = jax.tree.map(jnp.asarray, want)  # held by nothing else, as a restored checkpoint's
  gone = [weakref.ref(x) for x in jax.tree.leaves(params["blocks"])]
  listed = unstack(params, cfg.model, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), cfg.mesh.rules, consume=True)
  for name, stacked_weight in want["blocks"].items():
    for i in range(3):
      np.testing.assert_array_equal(listed["blocks"][i][name], stacked_weight[i])
  np.testing.assert_array_equal(listed["embed"], want["embed"])
  assert all(ref() is None for ref in gone)  # freed as they were split: never two copies of the weights


def test_a_window_covers_what_a_chunk_reaches_in_at_most_four_sizes():
  for S in (16, 100, 256, 1000):
    sizes = {window(need, S) for need in range(1, S + 1)}
    assert len(sizes) <= 4 and max(sizes) == S
    assert all(need <= window(need, S) <= S for need in range(1, S + 1))
  assert window(S + 9, S) == S


def test_a_prompt_pads_by_under_a_quarter_in_few_shapes():
  sizes = {prompt_bucket(n, 512) for n in range(1, 513)}
  assert sorted(sizes) == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
  assert all(0 <= prompt_bucket(n, 512) - n < max(16, n / 4) for n in range(1, 513))
  assert prompt_bucket(257, 260) == 260 and prompt_bucket(5, 8) == 8


def test_compiled_functions_do_not_grow_with_the_job(tokenizer):
  sampler = make_sampler(tokenizer)
  rng = np.random.default_rng(0)
  words = ["x", "y", "def", "return", "import", "for", "in", "range", "print", "self", "(", ")", ":"]
  prompts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(100)]
  stops = [int(t) for t in rng.choice(tokenizer.vocab_size, 40, replace=False)]  # rows finish all over
  out = sampler.generate(prompts, max_new_tokens=12, temperature=1.0, batch_size=8, chunk=4, stop_tokens=stops[:7])
  assert len({len(c.token_ids) for c in out}) > 3
  assert any(k[4] < k[2] for k in sampler.compiled if k[0] == "decode")  # ("decode", B, S, steps, window): some read less
  # One empty state, a decode chunk per window (at most 4), an insert per (power-of-two row count,
  # prompt bucket): 1 to 8 rows of 16, 32, 48 or 64 tokens.
  inserts = [k for k in sampler.compiled if k[0] == "insert"]  # ("insert", B, S, R, P)
  assert {k[3] for k in inserts} <= {1, 2, 4, 8} and {k[4] for k in inserts} <= {16, 32, 48, 64}, inserts
  assert len(sampler.compiled) <= 1 + 4 + 4 * 4, list(sampler.compiled)
  before = dict(sampler.compiled)
  sampler.generate(prompts[::-1], max_new_tokens=12, temperature=0.5, top_k=5, batch_size=8, chunk=4, seed=3)
  assert sampler.compiled.keys() <= before.keys() | {k for k in sampler.compiled if k[0] == "insert"}
  assert len(sampler.compiled) <= 1 + 4 + 4 * 4


def test_sampling_knobs():
  V = 50
  logits = jnp.tile(jnp.linspace(0.0, 5.0, V), (2000, 1))  # token V-1 most likely
  keys = jax.random.split(jax.random.key(0), 2000)
  args = lambda t, k, p: (jnp.float32(t), jnp.int32(k), jnp.float32(p))
  top5, _ = choose(keys, logits, *args(1.0, 5, 1.0))
  assert set(np.unique(top5)) == set(range(V - 5, V))
  probs = np.asarray(jax.nn.softmax(logits[0]))
  order = np.argsort(-probs)
  nucleus = set(order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1])
  top_p, _ = choose(keys, logits, *args(1.0, 0, 0.5))
  assert set(np.unique(top_p)) == nucleus
  greedy, logprob = choose(keys, logits, *args(0.0, 0, 1.0))
  assert set(np.unique(greedy)) == {V - 1}
  np.testing.assert_allclose(logprob, np.log(probs[V - 1]), rtol=1e-5)
  free, _ = choose(keys, logits, *args(1.0, 0, 1.0))
  assert len(np.unique(free)) > 30
  reversed_rows, _ = choose(keys[::-1], logits[::-1], *args(1.0, 0, 1.0))  # a row's draw is its key's alone
  np.testing.assert_array_equal(reversed_rows[::-1], free)


def test_temperature_top_k_and_top_p_together_match_numpy():
  """Frequencies of 20000 draws against the distribution numpy computes from the logits; ids of a
  padded vocabulary's tail are never drawn, greedy or sampled, however likely the model makes them."""
  V, T, k, p, N = 40, 0.7, 10, 0.8, 20000
  logits = np.random.default_rng(0).normal(0, 2, V).astype(np.float32)
  order = np.argsort(-logits)[:k]
  probs = np.exp(logits[order] / T - (logits[order] / T).max())
  probs /= probs.sum()
  nucleus = order[:int(np.sum(np.cumsum(probs) - probs < p))]  # the smallest prefix reaching p
  want = np.zeros(V)
  want[nucleus] = np.exp(logits[nucleus] / T) / np.exp(logits[nucleus] / T).sum()
  keys = jax.random.split(jax.random.key(1), N)
  tokens, _ = choose(keys, jnp.tile(logits, (N, 1)), jnp.float32(T), jnp.int32(k), jnp.float32(p))
  freq = np.bincount(np.asarray(tokens), minlength=V) / N
  assert set(np.flatnonzero(freq)) == set(nucleus.tolist())
  np.testing.assert_allclose(freq, want, atol=0.015)
  padded = np.concatenate([logits, np.full(8, 50.0, np.float32)])
  for knobs in ((0.0, 0, 1.0), (1.0, 0, 1.0), (T, k, p)):
    drawn, _ = choose(keys[:500], jnp.tile(padded, (500, 1)), *map(jnp.asarray, knobs), vocab=V)
    assert np.asarray(drawn).max() < V
  greedy, _ = choose(keys[:2], jnp.tile(padded, (2, 1)), jnp.float32(0), jnp.int32(0), jnp.float32(1), vocab=V)
  assert set(np.asarray(greedy)) == {int(np.argmax(logits))}


def test_seeds_samples_and_logprobs(tokenizer):
  sampler = make_sampler(tokenizer)
  kw = dict(max_new_tokens=8, temperature=1.0, num_samples=3, logprobs=True, stop_tokens=())
  a = sampler.generate(PROMPTS[:2], seed=1, **kw)
  assert [c.prompt for c in a] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
  assert [c.token_ids for c in a] == [c.token_ids for c in sampler.generate(PROMPTS[:2], seed=1, **kw)]
  assert [c.token_ids for c in a] != [c.token_ids for c in sampler.generate(PROMPTS[:2], seed=2, **kw)]
  assert len({tuple(c.token_ids) for c in a[:3]}) > 1
  # Log-probabilities are the model's, at each chosen token.
  model = nnx.merge(sampler.graphdef, sampler.params)
  seq = sampler.encode(PROMPTS[0]) + a[0].token_ids
  logp = jax.nn.log_softmax(model(jnp.asarray([seq]))[0], axis=-1)
  n = len(sampler.encode(PROMPTS[0]))
  want = [float(logp[n - 1 + i, t]) for i, t in enumerate(a[0].token_ids)]
  np.testing.assert_allclose(a[0].logprobs, want, atol=1e-4)
  assert sampler.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.0)[0].token_ids == \
      sampler.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.0, seed=9)[0].token_ids


def test_input_errors(tokenizer):
  sampler = make_sampler(tokenizer)
  with pytest.raises(ConfigError, match="prompt 1 is empty"):
    sampler.generate(["ok", ""], max_new_tokens=8)
  with pytest.raises(ConfigError, match=r"prompt 0 has \d+ tokens; with max_new_tokens=60 that exceeds the model's max_seq_len=64"):
    sampler.generate(["a long prompt " * 3], max_new_tokens=60)
  with pytest.raises(ConfigError, match=r"top_p=1.5 must be in \(0, 1\]"):
    sampler.generate(["ok"], max_new_tokens=8, top_p=1.5)
  for seed in (-1, 2**32):  # the same key as seed 2**32 - 1 and 0 before
    with pytest.raises(ConfigError, match=rf"^seed={seed} must be in \[0, 2\*\*32\): JAX keeps 32 bits of it, so others would repeat those$"):
      sampler.generate(["ok"], max_new_tokens=8, seed=seed)
  with pytest.raises(ConfigError, match="^batch_size=0 must be at least 1$"):  # it used to loop for ever
    sampler.generate(["ok"], max_new_tokens=8, batch_size=0)
  with pytest.raises(ConfigError, match=rf"^stop token {tokenizer.vocab_size} is not a token id of this vocabulary \(0 to {tokenizer.vocab_size - 1}\)$"):
    sampler.generate(["ok"], max_new_tokens=8, stop_tokens=(3, tokenizer.vocab_size))


def test_a_job_of_fewer_prompts_than_slots_decodes_only_its_rows(tokenizer):
  sampler = make_sampler(tokenizer)
  sampler.generate(PROMPTS[:1], max_new_tokens=4, batch_size=16)
  assert {k[1] for k in sampler.compiled if k[0] in ("decode", "insert", "empty")} == {1}, list(sampler.compiled)


def test_prefill_time_holds_no_compile(tokenizer, monkeypatch):
  """The prefill tokens/s lm-sample prints: every compile made while prefilling is one that
  `Sampler._compile` times and takes out (one it missed made a one-prompt job read 26 tokens/s, not 464)."""
  jax.clear_caches()  # compiles a process made earlier would hide one here
  inside = {"_insert": False, "_compile": False}

  def marked(name):
    method = getattr(Sampler, name)

    def call(*args, **kwargs):
      inside[name] = True
      try:
        return method(*args, **kwargs)
      finally:
        inside[name] = False
    return call

  for name in inside:
    monkeypatch.setattr(Sampler, name, marked(name))
  stray, timed = [], []

  def listen(event, seconds, **_):
    if "compile" in event and inside["_compile"]:
      timed.append(event)
    elif "compile" in event and inside["_insert"]:
      stray.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    make_sampler(tokenizer).generate(PROMPTS, max_new_tokens=4, temperature=0.5, seed=7)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert stray == [] and timed  # the events the listener looks for do come


def test_prompts_and_outputs_that_cannot_be_used_are_one_line(tmp_path, monkeypatch):
  for path, why in ((tmp_path / "missing" / "out.jsonl", "No such file or directory"), (tmp_path, "Is a directory")):
    with pytest.raises(ConfigError, match=f"^--output '{path}' cannot be written: {why}$"):
      jobs.open_output(path, {"seed": 0})
  binary = tmp_path / "image.bin"
  binary.write_bytes(bytes(range(256)))
  with pytest.raises(ConfigError, match="exists and is not an lm-sample output"):
    jobs.open_output(binary, {"seed": 0})
  one_line = tmp_path / "prompt.json"  # json.dump writes no line end: not a torn line of ours
  one_line.write_text('{"prompt": "def f(x):"}')
  with pytest.raises(ConfigError, match=f"^--output '{one_line}' exists and is not an lm-sample output; choose a new path$"):
    jobs.open_output(one_line, {"seed": 0})
  assert one_line.read_text() == '{"prompt": "def f(x):"}'
  torn = tmp_path / "torn.jsonl"  # a kill while the header was written
  torn.write_text('{"settings": {"se')
  out, done = jobs.open_output(torn, {"seed": 0})
  out.close()
  assert done == set() and torn.read_text() == '{"settings": {"seed": 0}}\n'
  with pytest.raises(ConfigError, match=f"^--prompts file '{binary}' is not UTF-8 text \\(byte 128\\)$"):
    jobs.read_prompts(str(binary))
  with pytest.raises(ConfigError, match=f"^--prompts file '{tmp_path}' is a directory$"):
    jobs.read_prompts(str(tmp_path))
  fifo = tmp_path / "fifo"  # a pipe, as /dev/stdin, <(...) or /dev/stdout give: read as a file, written as a stream
  os.mkfifo(fifo)
  writer = threading.Thread(target=lambda: fifo.write_text('{"prompt": "piped"}\n'), daemon=True)
  writer.start()
  assert jobs.read_prompts(str(fifo)) == ["piped"]
  writer.join()
  received, opened = [], []
  reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
  opener = threading.Thread(target=lambda: opened.append(jobs.open_output(fifo, {"seed": 0})), daemon=True)
  reader.start()
  opener.start()
  opener.join(30)
  if not opened:  # it read its own output pipe, waiting for ever: an end of file frees the reader
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
  assert opened, "open_output waited on a pipe"
  out, done = opened[0]
  out.close()
  reader.join(30)
  assert done == set() and received == ['{"settings": {"seed": 0}}\n']
  scraped = tmp_path / "scraped.jsonl"  # JSON may hold a line separator unescaped, as ensure_ascii=False writes it
  scraped.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in ("one\u2028two", "three")))
  assert jobs.read_prompts(str(scraped)) == ["one\u2028two", "three"]
  with monkeypatch.context() as m:
    m.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ConfigError, match=f"^--prompts file '{scraped}' cannot be read: Permission denied$"):
      jobs.read_prompts(str(scraped))
  from launch import sample
  with pytest.raises(SystemExit) as e:  # not taken for --output: launch.tpu_pod checks the flags it is given
    sample.main(["--workdir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.jsonl")])
  assert e.value.code == 2


@pytest.mark.slow
def test_cli_samples_a_checkpoint_trained_on_another_mesh(tmp_path):
  run = tmp_path / "run"
  out = run_trainer(run, "train.steps=4", "mesh.data=1", "mesh.fsdp=8")
  assert out.returncode == 0, out.stderr
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n" + json.dumps({"prompt": "import"}) + "\n")
  cmd = [sys.executable, "-m", "launch.sample", "--workdir", str(run), "--prompts", str(prompts), "mesh.data=-1",
         "--max-new-tokens", "6", "--temperature", "0", "--output", str(tmp_path / "out.jsonl")]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr
  assert "mesh: {'data': 2, 'fsdp': 1, 'tensor': 2}" in done.stderr and "kept tokens/s" in done.stderr
  header, *rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert header["settings"]["temperature"] == 0
  rows.sort(key=lambda r: r["index"])
  assert [(r["index"], r["prompt"]) for r in rows] == [(0, "def f(x):"), (1, "import")]
  assert all(set(r) == {"index", "prompt", "completion", "token_ids", "finish_reason"} for r in rows)
  first = rows[0]["token_ids"][0]
  stopped = subprocess.run(cmd[:-2] + ["--stop-token", str(first)], cwd=ROOT, capture_output=True, text=True, env=env)
  assert json.loads(min(stopped.stdout.splitlines())) | {"prompt": None} == \
      {"index": 0, "prompt": None, "completion": "", "token_ids": [], "finish_reason": "stop"}
  # The same checkpoint restored here: on the default decode mesh of 8 devices (tensor over the 2 kv
  # heads, data over slots, weights in the compute dtype) and on a 2x2x2 mesh, against the naive
  # decoder on one device.
  default = Sampler.from_workdir(run)
  assert dict(default.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  wq = default.params["blocks"][0]["wq"]
  assert wq.sharding.shard_shape(wq.shape) == (wq.shape[0], wq.shape[1] // 2, wq.shape[2])
  sampler = Sampler.from_workdir(run, mesh_cfg=config.MeshConfig(data=2, fsdp=2, tensor=2))
  assert sampler.params["blocks"][0]["wq"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  params = jax.tree.map(np.asarray, sampler.params)
  for r in rows:
    want = naive_greedy(sampler.cfg, params, sampler.encode(r["prompt"]), 6)
    assert r["token_ids"] == until_eos(want, sampler.tokenizer.eos_id)
  # Slots split over every device (no tensor axis): each row's keys and values (and prompt-lookup
  # history) are written on its own device, so decode steps and speculative rounds share nothing...
  rows_only = Sampler.from_workdir(run, mesh_cfg=config.MeshConfig(data=8, fsdp=1, tensor=1))
  for s in (default, sampler, rows_only):
    assert [c.token_ids for c in s.generate(["def f(x):", "import"], max_new_tokens=6)] == [r["token_ids"] for r in rows]
  decode = [f.as_text() for key, f in rows_only.compiled.items() if key[0] == "decode"]
  speculative.speculate(rows_only, speculative.Ngram(), 3)
  assert [c.token_ids for c in rows_only.generate(["def f(x):", "import"], max_new_tokens=6)] == [r["token_ids"] for r in rows]
  decode += [f.as_text() for key, f in rows_only.compiled.items() if key[0] == "speculate"]
  collectives = [line for h in decode for line in h.splitlines()
                 if re.search(r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", line)]
  # but the one flag of each chunk's loop: whether a row finished, which ends the chunk
  assert len(decode) >= 2 and all(re.search(r"= pred\[\] all-reduce\(", line) for line in collectives), collectives
  tokenizer = default.tokenizer.path
  tokenizer.write_bytes(tokenizer.read_bytes() + b"\0")  # another tokenizer where the run's was
  with pytest.raises(ConfigError, match=rf"tokenizer '{tokenizer}' has SHA-256 \w+\.\.\., but step 4 was trained with \w+\.\.\.; restore the run's tokenizer"):
    Sampler.from_workdir(run)


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("sample") / "run"
  out = run_trainer(run, "train.steps=1")
  assert out.returncode == 0, out.stderr
  return run


@pytest.mark.slow
def test_a_run_keeps_a_copy_of_the_tokenizer_it_was_given(one_step_run, tmp_path):
  given = tmp_path / "given.model"
  shutil.copyfile(one_step_run / "tokenizer.model", given)
  run = tmp_path / "run"
  assert run_trainer(run, "train.steps=1", f"tokenizer.path={given}").returncode == 0
  kept = (run / "tokenizer.model").read_bytes()
  given.write_bytes(kept + b"\0")  # retrained in place: the run's copy is the one it was trained with
  assert Sampler.from_workdir(run).tokenizer.path == run / "tokenizer.model"
  convert.to_hf(run, tmp_path / "hf")
  assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == kept
  resumed = run_trainer(run, "train.steps=2", f"tokenizer.path={given}")  # the same command, later
  assert resumed.returncode == 0, resumed.stderr
  assert f"it goes on with its copy, {run / 'tokenizer.model'}" in resumed.stdout
  given.write_bytes(kept)
  given.rename(tmp_path / "moved.model")
  assert Sampler.from_workdir(run).generate(["def"], max_new_tokens=2)[0].finish_reason in ("length", "stop")
  assert run_trainer(run, "train.steps=3", f"tokenizer.path={given}").returncode == 0  # gone: the copy again
  resumed = run_trainer(run, "train.steps=4", f"tokenizer.path={tmp_path / 'moved.model'}")  # where it went
  assert resumed.returncode == 0, resumed.stderr
  assert f"tokenizer.path: '{given}' -> '{tmp_path / 'moved.model'}'" in resumed.stdout
  (tmp_path / "moved.model").unlink()
  (run / "tokenizer.model").unlink()
  with pytest.raises(ConfigError, match=f"^the tokenizer {run} was trained with, {tmp_path / 'moved.model'}, is gone and {run / 'tokenizer.model'} does not exist; put one of them back$"):
    Sampler.from_workdir(run)
  with pytest.raises(ConfigError, match=f"^the tokenizer {run} was trained with, {run / 'tokenizer.model'}, does not exist; put it back$"):
    Sampler.from_workdir(run, step=3)  # steps 2 and 3 were trained with the copy


def sample_cli(*args):
  return subprocess.run([sys.executable, "-m", "launch.sample", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the model's max_seq_len=64"),
    (["--prompts", "{bad}"], "p.jsonl:2: malformed JSON (Expecting value at column 12)"),
    (["--prompt", "x", "--temperature", "inf"], "temperature=inf must be a finite number >= 0 (0 is greedy)"),
    (["--prompt", "x", "--draft", "{run}:3"], "--draft: work directory"),
    (["--prompt", "x", "--max-new-tokens", "4", "--batch-size", "-3"], "--batch-size=-3 must be at least 1"),
    (["--prompt", "x", "mesh.data=-1", "mesh.tensor=-1"], "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    (["--prompt", "x", "train.steps=3"], "override 'train.steps=3' is not a setting this command takes (mesh.data, "),
])
def test_cli_errors_are_one_line(args, message, one_step_run, tmp_path):
  bad = tmp_path / "p.jsonl"
  bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
  done = sample_cli("--workdir", str(one_step_run), *[str(bad) if a == "{bad}" else a.replace("{run}", str(one_step_run)) for a in args])
  assert done.returncode == 1
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], done.stderr


class Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


@pytest.mark.slow
def test_cli_edges(one_step_run, tmp_path, monkeypatch, capsys):
  """In process: a bad stop token is refused before --output records it (the corrected rerun is not
  refused); out-of-range knobs are one line; --prompt repeats; the progress bar keeps off a terminal that shows the
  completions; a closed stdout (`| head`) ends the job quietly."""
  from launch.sample import main
  out = tmp_path / "out.jsonl"
  run = ["--workdir", str(one_step_run), "--prompt", "def f(x):", "--max-new-tokens", "4"]
  assert main([*run, "--stop-token", "999999", "--output", str(out)]) == 1
  assert capsys.readouterr().err.splitlines()[-1].startswith("error: stop token 999999 is not a token id of this vocabulary")
  assert main([*run, "--stop-token", "5", "--output", str(out)]) == 0
  assert len(out.read_text().splitlines()) == 2
  capsys.readouterr()
  for args, message in ((["--top-k", str(2**31)], f"top_k={2**31} must be in [0, 2**31) (0, or the vocabulary size or more, keeps every token)"),
                        (["--draft-tokens", "3"], "--draft-tokens=3 needs --draft DIR or --speculate ngram")):
    assert main([*run, *args]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
  both = tmp_path / "both.jsonl"  # --prompt twice, the second with a byte that is not UTF-8 (as the shell passes it)
  assert main(["--workdir", str(one_step_run), "--prompt", "def f(x):", "--prompt", "caf\udce9", "--max-new-tokens", "2",
               "--output", str(both)]) == 0
  assert sorted((r["index"], r["prompt"]) for r in map(json.loads, both.read_text().splitlines()[1:])) == [(0, "def f(x):"), (1, "caf?")]
  prompts = tmp_path / "p.jsonl"  # with a byte-order mark, as some editors save
  prompts.write_text("\ufeff" + "".join(json.dumps({"prompt": f"def f{i}():"}) + "\n" for i in range(3)))
  many = ["--workdir", str(one_step_run), "--prompts", str(prompts), "--max-new-tokens", "4"]
  for output, bar in (([], False), (["--output", str(tmp_path / "bar.jsonl")], True)):
    stdout, stderr = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main([*many, *output]) == 0
    assert ("3/3 completions" in stderr.getvalue()) == bar, stderr.getvalue()
    assert len(stdout.getvalue().splitlines()) == (0 if bar else 3)
  read, write = os.pipe()
  os.close(read)  # the reader is gone
  monkeypatch.setattr(sys, "stdout", open(write, "w"))
  monkeypatch.setattr(sys, "stderr", Terminal())
  assert main(many) == 141
  assert sys.stderr.getvalue().startswith("mesh: ")
  sys.stdout.close()


def test_cli_missing_workdir(tmp_path):
  done = sample_cli("--workdir", str(tmp_path / "none"), "--prompt", "x")
  assert done.returncode == 1
  assert done.stderr.strip() == f"error: work directory '{tmp_path / 'none'}' has no checkpoints/; train there first"


@pytest.mark.slow
def test_a_killed_job_resumes_its_output(one_step_run, tmp_path):
  """Ctrl-C part-way, SIGKILL part-way, a torn last line, then the same command (other slots and
  sample.chunk) finishes the file: every (index, sample) once, equal to an uninterrupted run. Other
  knobs refuse in one line."""
  prompts = [f"def f{i}(x):" + " x" * (i % 7) for i in range(150)]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  out = tmp_path / "out.jsonl"
  args = ["--workdir", str(one_step_run), "--prompts", str(tmp_path / "p.jsonl"), "--num-samples", "2",
          "--max-new-tokens", "24", "--temperature", "0.9", "--seed", "1", "--output", str(out)]

  def stop_part_way(signum: int, lines: int, *more: str) -> subprocess.Popen:
    # Ctrl-C as at a terminal: a shell running the tests in the background ignores SIGINT, and its children would
    terminal = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from launch.sample import main; sys.exit(main())"
    job = subprocess.Popen([sys.executable, "-c", terminal, *args, "--batch-size", "2", *more], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while job.poll() is None and (not out.exists() or out.read_text().count("\n") < lines):
      time.sleep(0.02)
    job.send_signal(signum)
    job.wait()
    return job

  interrupted = stop_part_way(signal.SIGINT, 20, "--chunk", "2")  # Ctrl-C: one line; the file keeps what finished
  assert interrupted.returncode == 130
  assert interrupted.stderr.read().splitlines()[-1] == f"interrupted: {out} holds the completions made so far; the same command makes the rest"
  stop_part_way(signal.SIGKILL, out.read_text().count("\n") + 10)
  killed = out.read_text().count("\n")
  assert 30 <= killed < 1 + 2 * len(prompts)
  limit = out.stat().st_size + 300  # a disk that fills up after a line or two: one line, what is written stays

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  full = subprocess.run([sys.executable, "-m", "launch.sample", *args], cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files)
  assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
  assert full.stderr.splitlines()[-1] == (f"error: writing the completions to {out} failed (File too large); {out} holds the "
                                          "completions made so far, and the same command makes the rest")
  lines = out.read_text().count("\n")
  assert killed < lines < killed + 4
  with out.open("a") as f:
    f.write('{"index": 7, "sample": 1, "prompt": "def f7')  # what a kill mid-write leaves
  args[1] = str(one_step_run.parent / ".." / one_step_run.parent.name / one_step_run.name)  # the same run, named otherwise
  done = sample_cli(*args, "--batch-size", "8", "sample.chunk=5")  # the chunk from the config key
  assert done.returncode == 0, done.stderr
  assert f"{2 * len(prompts) - lines + 1} completions to make" in done.stderr
  header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == len({(r["index"], r["sample"]) for r in rows}) == 2 * len(prompts)
  sampler = Sampler.from_workdir(one_step_run)
  want = sampler.generate(prompts, max_new_tokens=24, temperature=0.9, seed=1, num_samples=2)
  rows.sort(key=lambda r: (r["index"], r["sample"]))
  assert [(r["prompt"], r["token_ids"], r["finish_reason"]) for r in rows] == [(c.prompt, c.token_ids, c.finish_reason) for c in want]
  finished = out.read_bytes()
  other = sample_cli(*[a if a != "0.9" else "0.5" for a in args])
  assert other.returncode == 1 and "Traceback" not in other.stderr
  assert [line for line in other.stderr.splitlines() if line.startswith("error:")] == \
      [f"error: --output '{out}' was written with other settings (temperature: 0.9 then, 0.5 now); rerun with those or choose a new path"]
  assert out.read_bytes() == finished


@pytest.mark.slow
def test_cli_speculative_decoding(one_step_run, tmp_path):
  """--draft DIR:STEP with the run as its own draft keeps every guess and gives plain greedy's tokens;
  an output file records which checkpoint drafted (a later one of the same run is another draft);
  a draft trained with another tokenizer and a round of no guesses are refused in one line."""
  out = tmp_path / "out.jsonl"
  done = sample_cli("--workdir", str(one_step_run), "--prompt", "def f(x):", "--max-new-tokens", "9", "--temperature", "0",
                    "--draft", f"{one_step_run}:1", "--draft-tokens", "3", "--output", str(out))
  assert done.returncode == 0, done.stderr
  header, row = [json.loads(line) for line in out.read_text().splitlines()]
  passes = -(-len(row["token_ids"]) // 4)  # each keeps 3 guesses and adds one; the last is cut at the end
  assert f"(acceptance 100%, {len(row['token_ids']) / passes:.2f} tokens per target pass)" in done.stderr
  assert header["settings"]["speculate"] == f"draft {one_step_run.absolute()} step 1, 3 tokens"
  target = Sampler.from_workdir(one_step_run)
  plain = target.generate(["def f(x):"], max_new_tokens=9)[0].token_ids
  assert row["token_ids"] == plain
  # a draft of one kv head: the default decode mesh splits no heads (it was sized for the target's two)
  small = tmp_path / "small"
  assert run_trainer(small, "train.steps=1", "model.num_heads=2", "model.num_kv_heads=1",
                     f"tokenizer.path={one_step_run / 'tokenizer.model'}").returncode == 0
  done = sample_cli("--workdir", str(one_step_run), "--prompt", "def f(x):", "--max-new-tokens", "9", "--temperature", "0",
                    "--draft", str(small))
  assert done.returncode == 0, done.stderr
  assert "mesh: {'data': 8, 'fsdp': 1, 'tensor': 1}" in done.stderr
  assert json.loads(done.stdout)["token_ids"] == plain
  target.tokenizer_digest = "0" * 64
  with pytest.raises(ConfigError, match=f"^--draft '{one_step_run}' was trained with tokenizer SHA-256 [0-9a-f]{{12}}\\.\\.\\., the target with 000000000000\\.\\.\\.; a draft must share the target's tokenizer$"):
    speculative.load_draft(target, str(one_step_run))
  for k in (0, 64):  # guesses past the longest sequence would only be dropped, after building [slots, K, vocab]
    with pytest.raises(ConfigError, match=f"^--draft-tokens={k} must be at least 1 and less than the model's max_seq_len=64$"):
      speculative.speculate(target, speculative.Ngram(), k)
  # --quantize and --kv-cache apply to the draft as to the target
  int8 = Sampler.from_workdir(one_step_run, quantize="int8", kv="int8", sharing=[speculative.draft_model(str(small))])
  draft = speculative.load_draft(int8, str(small)).draft
  assert draft.params["blocks"][0]["wq"].qvalue.dtype == jnp.int8 and draft.kv == "int8"
