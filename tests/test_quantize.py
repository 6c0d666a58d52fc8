"""Weight-only int8 sampling: the rounding against a per-channel reference, the model against float
arithmetic on the same weights, and the loss and greedy output against the float model on a trained run
(there, also the int8 key/value cache's decode steps)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from launch.sample import main as sample_main
from lm import config, data, sharding
from lm.config import ConfigError
from lm.model import Transformer
from lm.params import abstract_model, param_shardings
from lm.quantize import quantized
from lm.sampler import Sampler
from tests.conftest import run_trainer, tiny_overrides

# The axes each matmul of the stacked model (lm.model) contracts, per matrix: its other axes are output
# channels. The embedding table [vocab, embed] is read by rows, and as the tied unembedding over `embed`.
INPUT_AXES = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w_gate": (1,), "w_up": (1,), "w_down": (1,),
              "embed": (1,)}


def dequantized(int8):
  """Float weights from int8 values and scales, by numpy broadcasting."""
  is_int8 = lambda x: hasattr(x, "qvalue")
  return jax.tree.map(lambda x: np.asarray(x.qvalue, np.float32) * np.asarray(x.scale) if is_int8(x) else np.asarray(x),
                      int8, is_leaf=is_int8)


def test_int8_rounds_each_output_channel_and_the_model_reads_it():
  overrides = tiny_overrides(**{"model.vocab_size": 512, "model.init_std": 0.3})
  cfg = config.load(None, overrides + ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abstract = abstract_model(cfg.model)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0)))),
                   out_shardings=param_shardings(abstract, mesh, cfg.mesh.rules))()
  int8_graphdef, int8 = quantized(params, cfg.model, mesh, cfg.mesh.rules, "int8")
  for name, axes in INPUT_AXES.items():
    w, q = (params[name], int8[name]) if name == "embed" else (params["blocks"][name], int8["blocks"][name])
    # computed where the float weights lie: the same split over the 4 x 2 devices, never gathered
    assert q.qvalue.dtype == jnp.int8 and q.qvalue.sharding.spec == w.sharding.spec
    # one step per output channel, mapping its largest magnitude to 127.5 (qwix's convention: the
    # outermost levels get full buckets); every weight is the nearest level
    w = np.asarray(w)
    step = np.abs(w).max(axis=axes, keepdims=True) / 127.5
    np.testing.assert_allclose(q.scale, step, rtol=1e-6)
    assert np.all(np.abs(np.asarray(q.qvalue) * step - w) <= step * (0.5 + 1e-4))
  assert int8["final_norm"].dtype == jnp.float32
  reference = dequantized(int8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (4, 24)), jnp.int32)
  forward = lambda graphdef, params: jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))(params)
  np.testing.assert_allclose(forward(int8_graphdef, int8), forward(graphdef, reference), atol=1e-4, rtol=1e-4)
  with pytest.raises(ConfigError, match="--quantize 'int4' is not one of: int8"):
    Sampler(cfg, params, None, mesh, "int4")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("quantize") / "run"
  out = run_trainer(run, "train.steps=400", "eval.every=400", "model.max_seq_len=128", devices=1)
  assert out.returncode == 0, out.stderr
  return run


def one_document(tokens_BxL: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": tokens_BxL, "segment_ids": np.ones_like(tokens_BxL),
          "positions": np.broadcast_to(np.arange(tokens_BxL.shape[1]), tokens_BxL.shape)}


@pytest.mark.slow
def test_int8_on_a_trained_run_loses_under_one_percent_and_keeps_greedy_output(trained_run, tmp_path, capsys):
  exact = Sampler.from_workdir(trained_run)
  int8 = Sampler.from_workdir(trained_run, quantize="int8")
  assert int8.params["blocks"][0]["wq"].qvalue.dtype == jnp.int8
  forward = {s: jax.jit(lambda p, b, g=s.graphdef: nnx.merge(g, p)(b["inputs"], b["segment_ids"], b["positions"]))
             for s in (exact, int8)}
  # The trainer's own held-out batches (lm.loop: the validation split), whose loss it logged.
  cfg = exact.cfg
  _, val_docs = data.split(cfg.data)
  batches = data.held_out_batches(val_docs, exact.tokenizer, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                                  rows=range(cfg.train.batch_size), limit=cfg.eval.steps)
  real = np.stack([b["segment_ids"] != 0 for b in batches])
  targets = np.stack([b["targets"] for b in batches])
  logits, loss = {}, {}
  for s in (exact, int8):
    logits[s] = np.stack([forward[s](s.params, b) for b in batches])
    logp = jax.nn.log_softmax(logits[s], axis=-1)
    loss[s] = -float(np.sum(np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * real) / real.sum())
  logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  assert loss[exact] == pytest.approx([r["val_loss"] for r in logged if "val_loss" in r][-1], rel=1e-4)
  assert loss[int8] <= 1.01 * loss[exact]
  # Logits within 0.25 of float at every held-out position, 0.02 on average (their standard deviation
  # is about 3.7; measured: 0.13 and 0.010).
  error = np.abs(logits[exact] - logits[int8])[real]
  assert error.max() < 0.25 and error.mean() < 0.02
  # Greedy continuations of 32 held-out snippets, 64 tokens each: given the same text, int8 picks the
  # float model's next token at least 90% of the time. (Left to run on their own, two rows part at the
  # first near-tie and rarely meet again: 99.95% of tokens agreed so on one trained run, 86.8% on one
  # whose data came in another order, with the same loss and logit error.)
  text = "".join(val_docs[i] for i in range(len(val_docs)))
  prompts = [text[k * len(text) // 32:][:48] for k in range(32)]
  want, got = (s.generate(prompts, max_new_tokens=64, batch_size=32, logprobs=True) for s in (exact, int8))
  given = np.zeros((32, cfg.model.max_seq_len), np.int32)
  for r, (p, c) in enumerate(zip(prompts, want)):
    given[r, :len(exact.encode(p)) + len(c.token_ids)] = exact.encode(p) + c.token_ids
  picks = np.asarray(jnp.argmax(forward[int8](int8.params, one_document(given)), axis=-1))
  agree = [picks[r, len(exact.encode(p)) - 1 + np.arange(len(c.token_ids))] == np.asarray(c.token_ids)
           for r, (p, c) in enumerate(zip(prompts, want))]
  assert np.mean(np.concatenate(agree)) >= 0.9
  # An int8 key/value cache, fed the float model's continuations after its prompts' prefill (so one
  # near-tie does not part the texts for good): the decode steps' logits stay near the float model's
  # full forward pass, and pick its next token.
  kv = Sampler.from_workdir(trained_run, kv="int8")
  ids = [kv.encode(p) for p in prompts]
  prompt_RxP, forced_RxT = np.zeros((32, max(map(len, ids))), np.int32), np.zeros((32, 63), np.int32)
  for r, (row, c) in enumerate(zip(ids, want)):
    prompt_RxP[r, :len(row)], forced_RxT[r, :len(c.token_ids) - 1] = row, c.token_ids[:-1]
  lengths_R = np.asarray([len(row) for row in ids], np.int32)
  cache = jax.jit(kv.prefill)(kv.params, kv.empty_state(32, cfg.model.max_seq_len)["cache"], jnp.asarray(prompt_RxP),
                                 jnp.asarray(lengths_R), jnp.arange(32, dtype=jnp.int32))
  positions_RxT = lengths_R[:, None] + np.arange(63)
  decoded = np.asarray(jax.jit(lambda p, c: nnx.merge(kv.graphdef, p).decode(jnp.asarray(forced_RxT), jnp.asarray(positions_RxT), c)[0])(
      kv.params, cache))
  full = np.asarray(forward[exact](exact.params, one_document(given)))
  fed = [np.arange(len(c.token_ids) - 1) for c in want]
  error = np.concatenate([np.abs(decoded[r, j] - full[r, positions_RxT[r, j]]) for r, j in enumerate(fed)])
  agree = np.concatenate([np.argmax(decoded[r, j], -1) == np.asarray(c.token_ids[1:]) for r, (j, c) in enumerate(zip(fed, want))])
  # Measured: logits within 0.025 (0.0026 on average), 99.9% of 2,016 next tokens the same.
  assert error.max() < 0.1 and error.mean() < 0.01 and agree.mean() >= 0.95
  # The compiled prefill and decode score tokens as the int8 model's full forward pass does.
  seqs = [int8.encode(p) + c.token_ids for p, c in zip(prompts, got)]
  tokens = np.zeros((32, cfg.model.max_seq_len), np.int32)
  for r, seq in enumerate(seqs):
    tokens[r, :len(seq)] = seq
  logp = jax.nn.log_softmax(forward[int8](int8.params, one_document(tokens)), axis=-1)
  for r, (p, c) in enumerate(zip(prompts, got)):
    n = len(int8.encode(p))
    np.testing.assert_allclose(c.logprobs, logp[r, n - 1 + np.arange(len(c.token_ids)), c.token_ids], atol=1e-4)
  # The command line samples the same tokens.
  (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompts[0]}) + "\n")
  assert sample_main(["--workdir", str(trained_run), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "64",
                      "--temperature", "0", "--quantize", "int8"]) == 0
  assert json.loads(capsys.readouterr().out)["token_ids"] == got[0].token_ids
