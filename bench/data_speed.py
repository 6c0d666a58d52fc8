"""Input pipeline throughput per host: python -m bench.data_speed --tokenizer MODEL [--source SPEC]

Tokens/s at a global batch of 256 x 2048 for text tokenized on the fly (in the training process, and
with data.workers=2) and for a token cache of the same documents written by lm-prepare here; time to
the first batch of 1,024 rows; lm-prepare's own throughput; and beside them the tokens/s one TPU v5p
host (4 chips) consumes at 50% MFU for the 125M, 1B and 7B presets.

A token cache is read with the default data.shuffle_window for each batch size. Text is timed with a
window of 1: a window changes only the order of the rows, not the work of making them, but text makes
a window's rows before it yields the first, which would swamp the timing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from lm import data, token_cache
from lm.config import DataConfig
from lm.tokenizer import Tokenizer

SEQ_LEN, BATCH, FIRST_BATCH = 2048, 256, 1024
V5P_HOST_FLOPS = 4 * 459e12  # lm.flops.PEAK_FLOPS["TPU v5p"] per chip, 4 chips a host


def tokens_per_second(docs, tokenizer: Tokenizer, batches: int, workers: int, window: int) -> tuple[float, float]:
  """(seconds to the first batch, tokens/s over `batches` more) at BATCH x SEQ_LEN, once every
  worker has made its first batch."""
  start = time.perf_counter()
  it = iter(data.batches(docs, tokenizer, seq_len=SEQ_LEN, global_batch=BATCH, seed=0, workers=workers, shuffle_window=window))
  next(it)
  first = time.perf_counter() - start
  for _ in range(workers - 1):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * BATCH * SEQ_LEN / (time.perf_counter() - start)
  it.close()
  return first, rate


def first_batch_seconds(docs, tokenizer: Tokenizer, window: int) -> float:
  start = time.perf_counter()
  it = iter(data.batches(docs, tokenizer, seq_len=SEQ_LEN, global_batch=FIRST_BATCH, seed=0, shuffle_window=window))
  next(it)
  seconds = time.perf_counter() - start
  it.close()
  return seconds


def v5p_needs() -> dict[str, float]:
  """Tokens/s of one v5p host at 50% MFU for each preset."""
  from lm import config, flops  # jax only now: prepare's worker processes are forked before it

  needs = {}
  for name in ("125m", "1b", "7b"):
    cfg = config.load(f"configs/{name}.yaml")
    needs[name.upper()] = 0.5 * V5P_HOST_FLOPS / flops.flops_per_token(cfg.model, cfg.train.seq_len)
  return needs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokenizer", required=True, help="a sentencepiece .model, e.g. a 32k BPE")
  parser.add_argument("--source", default="stdlib", help="data.source to read")
  parser.add_argument("--batches", type=int, default=8, help="batches timed after the first")
  args = parser.parse_args()
  tokenizer = Tokenizer(args.tokenizer)
  cores = os.cpu_count()
  with tempfile.TemporaryDirectory() as cache_dir:
    docs = data.documents(args.source)
    start = time.perf_counter()
    index = token_cache.prepare(docs, args.source, tokenizer, cache_dir, workers=cores, shard_docs=64, progress=False)
    prepare_rate = index["tokens"] / (time.perf_counter() - start)
    raw, _ = data.split(DataConfig(source=args.source))
    cached, _ = data.split(DataConfig(source=f"tokens:{cache_dir}"))
    window, first_window = (data.shuffle_window(DataConfig(), rows, SEQ_LEN) for rows in (BATCH, FIRST_BATCH))
    rows = {"text, data.workers=0": (raw, 0, 1), "text, data.workers=2": (raw, 2, 1),
            f"token cache (tokens:DIR), shuffle_window={window}": (cached, 0, window)}
    results = {name: tokens_per_second(d, tokenizer, args.batches, w, win) for name, (d, w, win) in rows.items()}
    firsts = {"text, shuffle_window=1": first_batch_seconds(raw, tokenizer, 1),
              f"token cache, shuffle_window={first_window}": first_batch_seconds(cached, tokenizer, first_window)}
  needs = v5p_needs()

  base = results["text, data.workers=0"][1]
  print(f"{os.cpu_count()} cores | {index['documents']:,} documents, {index['tokens']:,} tokens | tokenizer {tokenizer.path.name} "
        f"({tokenizer.vocab_size} pieces) | global batch {BATCH} x {SEQ_LEN}\n")
  print("| pipeline | tokens/s per host | vs text | first batch of 256 rows (s) |")
  print("|---|---|---|---|")
  for name, (first, rate) in results.items():
    print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {first:.2f} |")
  print(f"| lm-prepare, {cores} worker processes | {prepare_rate:,.0f} | {prepare_rate / base:.2f}x | |")
  print(f"\nfirst batch of {FIRST_BATCH} x {SEQ_LEN}: " + ", ".join(f"{k} {v:.2f} s" for k, v in firsts.items()))
  print("\n| TPU v5p host (4 chips) at 50% MFU needs | tokens/s |\n|---|---|")
  for name, rate in needs.items():
    print(f"| {name} preset | {rate:,.0f} |")


if __name__ == "__main__":
  main()
