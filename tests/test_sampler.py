"""The KV-cached sampler against a naive decoder that recomputes the whole sequence every step."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config, sharding
from lm.config import ConfigError
from lm.model import Transformer
from lm.params import abstract_model
from lm.sampler import Sampler, choose
from tests.conftest import ROOT, run_trainer, tiny_overrides


def make_sampler(tokenizer, devices=None, mesh=("mesh.data=1", "mesh.fsdp=1")):
  """A random model with peaked logits (so greedy choices are far from ties)."""
  cfg = config.load(None, tiny_overrides(**{"model.vocab_size": tokenizer.vocab_size, "model.init_std": 0.3}) + list(mesh))
  devices = devices or jax.devices()[:1]
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0))))
  return Sampler(cfg, params, tokenizer, sharding.make_mesh(cfg.mesh, devices))


def naive_greedy(cfg, params, ids, n):
  """Recomputes the whole sequence for every new token; stops after an end-of-sequence token."""
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


def test_every_cached_decode_step_matches_the_full_forward_pass(tokenizer):
  sampler = make_sampler(tokenizer)
  model = nnx.merge(sampler.graphdef, sampler.params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, tokenizer.vocab_size, (2, 20)), jnp.int32)
  full = model(tokens)
  prompt, S = 8, 20
  _, (k, v) = model.prefill(tokens[:, :prompt], jnp.ones((2, prompt), jnp.int32), jnp.tile(jnp.arange(prompt), (2, 1)))
  pad = [(0, 0), (0, 0), (0, S - prompt), (0, 0), (0, 0)]
  cache = (jnp.pad(k, pad), jnp.pad(v, pad))
  for t in range(prompt, S):
    visible = jnp.broadcast_to(jnp.arange(S) <= t, (2, 1, S))
    logits, cache = model.decode(tokens[:, t:t + 1], jnp.full((2, 1), t), cache, t, visible)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4)


def test_a_row_does_not_depend_on_the_other_rows(tokenizer):
  sampler = make_sampler(tokenizer)
  for knobs in (dict(), dict(temperature=1.0, top_k=50, seed=3)):
    batched = [c.token_ids for c in sampler.generate(PROMPTS, max_new_tokens=10, **knobs)]
    for i, prompt in enumerate(PROMPTS):
      # sampled rows draw from a key of (seed, prompt index, sample index): keep the prompt's index
      alone = sampler.generate(PROMPTS[:i + 1] if knobs else [prompt], max_new_tokens=10, **knobs)[-1]
      assert alone.token_ids == batched[i]
    more = sampler.generate(PROMPTS + ["x = 1"], max_new_tokens=10, **knobs)  # the padding row made real
    assert [c.token_ids for c in more[:len(PROMPTS)]] == batched


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
  again, _ = choose(keys, logits, *args(1.0, 0, 1.0))
  np.testing.assert_array_equal(free, again)


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


def test_compiled_functions_are_reused(tokenizer):
  sampler = make_sampler(tokenizer)
  sampler.generate(["a b", "c"], max_new_tokens=6)
  first = sampler.compiled[(2, 16, 6)]
  sampler.generate(["other words", "x", "three"], max_new_tokens=6, temperature=0.7, top_p=0.9)  # 4 rows
  seconds = sampler.timing.compile_seconds
  sampler.generate(["other words", "x"], max_new_tokens=6, temperature=0.7, top_p=0.9)  # 2 rows again
  assert list(sampler.compiled) == [(2, 16, 6), (4, 16, 6)]
  assert sampler.compiled[(2, 16, 6)] is first and sampler.timing.compile_seconds == seconds


def test_input_errors(tokenizer):
  sampler = make_sampler(tokenizer)
  with pytest.raises(ConfigError, match="prompt 1 is empty"):
    sampler.generate(["ok", ""], max_new_tokens=8)
  with pytest.raises(ConfigError, match=r"prompt 0 has \d+ tokens; with max_new_tokens=60 that exceeds the model's max_seq_len=64"):
    sampler.generate(["a long prompt " * 3], max_new_tokens=60)
  with pytest.raises(ConfigError, match=r"top_p=1.5 must be in \(0, 1\]"):
    sampler.generate(["ok"], max_new_tokens=8, top_p=1.5)


@pytest.mark.slow
def test_cli_samples_a_checkpoint_trained_on_another_mesh(tmp_path):
  run = tmp_path / "run"
  out = run_trainer(run, "train.steps=4", "mesh.data=1", "mesh.fsdp=8")
  assert out.returncode == 0, out.stderr
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n" + json.dumps({"prompt": "import"}) + "\n")
  cmd = [sys.executable, "-m", "launch.sample", "--workdir", str(run), "--prompts", str(prompts),
         "--max-new-tokens", "6", "--temperature", "0", "--output", str(tmp_path / "out.jsonl")]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr
  assert "prefill" in done.stderr and "decode" in done.stderr
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["def f(x):", "import"]
  assert all(set(r) == {"prompt", "completion", "token_ids", "finish_reason"} for r in rows)
  first = rows[0]["token_ids"][0]
  stopped = subprocess.run(cmd[:-2] + ["--stop-token", str(first)], cwd=ROOT, capture_output=True, text=True, env=env)
  assert json.loads(stopped.stdout.splitlines()[0]) | {"prompt": None} == \
      {"prompt": None, "completion": "", "token_ids": [], "finish_reason": "stop"}
  # The same checkpoint, restored here onto a 2x2x2 mesh, against the naive decoder on one device.
  sampler = Sampler.from_workdir(run, mesh_cfg=config.MeshConfig(data=2, fsdp=2, tensor=2))
  assert sampler.params["blocks"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  params = jax.tree.map(np.asarray, sampler.params)
  for r in rows:
    want = naive_greedy(sampler.cfg, params, sampler.encode(r["prompt"]), 6)
    assert r["token_ids"] == until_eos(want, sampler.tokenizer.eos_id)
  assert [c.token_ids for c in sampler.generate(["def f(x):", "import"], max_new_tokens=6)] == [r["token_ids"] for r in rows]


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("sample") / "run"
  out = run_trainer(run, "train.steps=1")
  assert out.returncode == 0, out.stderr
  return run


def sample_cli(*args):
  return subprocess.run([sys.executable, "-m", "launch.sample", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the model's max_seq_len=64"),
    (["--prompts", "{bad}"], "p.jsonl:2: malformed JSON"),
])
def test_cli_errors_are_one_line(args, message, one_step_run, tmp_path):
  bad = tmp_path / "p.jsonl"
  bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
  done = sample_cli("--workdir", str(one_step_run), *[str(bad) if a == "{bad}" else a for a in args])
  assert done.returncode == 1
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], done.stderr


def test_cli_missing_workdir(tmp_path):
  done = sample_cli("--workdir", str(tmp_path / "none"), "--prompt", "x")
  assert done.returncode == 1
  assert done.stderr.strip() == f"error: work directory '{tmp_path / 'none'}' has no checkpoints/; train there first"
