"""Decode throughput with int8 weights, and with an int8 KV cache, against float ones: python -m bench.decode_speed

Greedy decoding by the KV-cached sampler on the width-384 benchmark model (random weights: the speed
does not depend on them), at batch 1 and 8: with the float parameters and cache, with
`quantize="int8"`, and with `kv="int8"`. Each configuration is compiled and run once before it is timed.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
from flax import nnx

from lm import config, data, sharding
from lm.model import Transformer, count_params
from lm.sampler import Knobs, Request, Sampler
from lm.tokenizer import train as train_tokenizer

MODEL = ["model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.num_kv_heads=6", "model.d_ff=1536",
         "model.max_seq_len=512", "mesh.data=1"]


def decode_rate(sampler: Sampler, ids: list[int], rows: int, new_tokens: int) -> float:
  """Every row decodes all `new_tokens`: the samplers have no tokenizer, so no end-of-sequence stops one."""
  run = lambda: list(sampler.run([Request(r, 0, "", ids, new_tokens) for r in range(rows)], Knobs(), batch_size=rows))
  run()
  sampler.timing = type(sampler.timing)()
  run()
  return sampler.timing.decode_tokens / sampler.timing.decode_seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--prompt-tokens", type=int, default=64)
  parser.add_argument("--dtype", default="float32", help="the compute dtype (model.dtype)")
  args = parser.parse_args()
  docs = data.TextFiles(data.stdlib_files())
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_tokenizer((docs[i] for i in range(0, len(docs), 9)),
                          config.TokenizerConfig(vocab_size=2048, train_sentences=20000), f"{tmp}/t.model")
  cfg = config.load(None, MODEL + [f"model.vocab_size={tok.vocab_size}", f"model.dtype={args.dtype}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0))))
  samplers = {"float": Sampler(cfg, params, None, mesh), "int8": Sampler(cfg, params, None, mesh, "int8"),
              "kv": Sampler(cfg, params, None, mesh, kv="int8")}
  ids = [tok.bos_id] + tok.encode(" ".join(docs[0].split()))[: args.prompt_tokens - 1]
  print(f"model: {count_params(cfg.model) / 1e6:.1f}M parameters (6 layers, width 384, vocab {tok.vocab_size}), "
        f"{args.dtype} compute; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; "
        f"device: {jax.devices()[0].device_kind}\n")
  print("| batch | float: decode tokens/s | int8 weights: decode tokens/s | int8 / float | int8 KV cache: decode tokens/s | int8 KV / float |")
  print("|---|---|---|---|---|---|")
  for rows in (1, 8):
    rates = {name: decode_rate(s, ids, rows, args.new_tokens) for name, s in samplers.items()}
    print(f"| {rows} | {rates['float']:,.0f} | {rates['int8']:,.0f} | {rates['int8'] / rates['float']:.2f}x "
          f"| {rates['kv']:,.0f} | {rates['kv'] / rates['float']:.2f}x |")


if __name__ == "__main__":
  main()
