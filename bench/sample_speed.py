"""Sampling throughput: python -m bench.sample_speed

The KV-cached sampler (prefill, then a scan of decode steps) against a naive decoder that recomputes
the full forward pass over the whole sequence for every new token, on the width-384 benchmark model.
The naive decoder runs a few steps at the full sequence length (each of its steps costs the same,
one forward pass of that shape) and its rate is taken from those.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lm import config, data, sharding
from lm.model import Transformer, count_params
from lm.params import abstract_model
from lm.sampler import Sampler
from lm.tokenizer import train as train_tokenizer

MODEL = ["model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.num_kv_heads=6", "model.d_ff=1536",
         "model.max_seq_len=512", "model.dtype=float32", "mesh.data=1"]


def naive_rate(cfg: config.Config, params, rows: int, length: int, steps: int) -> float:
  graphdef = abstract_model(cfg.model)[0]
  forward = jax.jit(lambda params, tokens: jnp.argmax(nnx.merge(graphdef, params)(tokens)[:, -1], axis=-1))
  tokens = jnp.zeros((rows, length), jnp.int32)
  forward(params, tokens).block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    forward(params, tokens).block_until_ready()
  return rows * steps / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--prompt-tokens", type=int, default=64)
  parser.add_argument("--naive-steps", type=int, default=4)
  args = parser.parse_args()
  docs = data.TextFiles(data.stdlib_files())
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_tokenizer((docs[i] for i in range(0, len(docs), 9)),
                          config.TokenizerConfig(vocab_size=2048, train_sentences=20000), f"{tmp}/t.model")
  cfg = config.load(None, MODEL + [f"model.vocab_size={tok.vocab_size}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0))))
  sampler = Sampler(cfg, params, tok, mesh)
  text = " ".join(docs[0].split())
  prompt = tok.decode(tok.encode(text)[: args.prompt_tokens - 1])  # with BOS: prompt_tokens tokens
  length = args.prompt_tokens + args.new_tokens
  print(f"model: {count_params(cfg.model) / 1e6:.1f}M parameters (6 layers, width 384, vocab {tok.vocab_size}); "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; device: {jax.devices()[0].device_kind}\n")
  print("| batch | prefill tokens/s | decode tokens/s (KV cache) | naive decoder tokens/s | speed-up |")
  print("|---|---|---|---|---|")
  for rows in (1, 16):
    sampler.generate([prompt] * rows, max_new_tokens=args.new_tokens, stop_tokens=(), batch_size=rows)  # compile
    sampler.timing = type(sampler.timing)()
    sampler.generate([prompt] * rows, max_new_tokens=args.new_tokens, stop_tokens=(), batch_size=rows)
    t = sampler.timing
    cached = t.decode_tokens / t.decode_seconds
    naive = naive_rate(cfg, params, rows, length, args.naive_steps)
    print(f"| {rows} | {t.prefill_tokens / t.prefill_seconds:,.0f} | {cached:,.0f} | {naive:,.1f} | {cached / naive:.0f}x |")


if __name__ == "__main__":
  main()
