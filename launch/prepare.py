"""Tokenize a source once into a token cache that training reads as data.source=tokens:OUT:
python -m launch.prepare --out DIR [--config YAML] data.source=... [tokenizer.path=...] [key=value ...]

Rerunning the same command resumes an interrupted one. Without tokenizer.path, a tokenizer is
trained first on the documents that training from the cache reads, not those it holds out (as
lm-train trains its own), and kept in OUT.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lm import config, data, token_cache
from lm.config import ConfigError
from lm.files import writable_dir
from lm.tokenizer import Tokenizer, check_trained_as, train as train_tokenizer


def training_documents(docs, cfg: config.DataConfig):
  """The documents that training from the cache reads, or all where too few to hold any out (a
  cache for data.val_source's side, say): lm-train names the problem if it must split them."""
  try:
    train, _ = data.split_documents(docs, cfg.val_fraction, cfg.source)
  except ConfigError:
    train = docs
  return (train[i] for i in range(len(train)))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lm-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="the cache directory")
  parser.add_argument("--config", help="YAML preset whose data and tokenizer settings to use")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: every core)")
  parser.add_argument("--shard-docs", type=int, default=1024, help="documents per shard")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. data.source='jsonl:web/*.jsonl.zst'")
  args = parser.parse_intermixed_args(argv)  # settings before or after the flags, as lm-train takes them
  try:
    if args.workers < 1 or args.shard_docs < 1:
      raise ConfigError(f"--workers={args.workers} and --shard-docs={args.shard_docs} must be at least 1")
    cfg = config.load(args.config, args.overrides)
    out = Path(args.out)
    token_cache.existing(out)  # before a tokenizer is trained into it
    if cfg.data.mixture or cfg.data.val_source:
      raise ConfigError("lm-prepare tokenizes data.source alone; prepare each source of data.mixture (or data.val_source) into its own cache")
    if cfg.data.source.startswith("tokens:"):
      raise ConfigError(f"data.source='{cfg.data.source}' is a token cache already; lm-prepare tokenizes the others: stdlib, text files, "
                        f"jsonl:, parquet: or arrayrecord:")
    docs = data.documents(cfg.data.source, cfg.data.text_field)
    given = Tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else None
    writable_dir(out, "--out directory")  # after the checks (a refusal leaves no directory), before the long work
    if given:
      tokenizer = given
    elif (out / "tokenizer.model").exists():  # trained by an earlier attempt
      tokenizer = Tokenizer(out / "tokenizer.model")
      check_trained_as(tokenizer, cfg.tokenizer, "--out")
    else:  # on the documents that training from the cache does not hold out, as lm-train's own
      tokenizer = train_tokenizer(training_documents(docs, cfg.data), cfg.tokenizer, out / "tokenizer.model")
    index = token_cache.prepare(docs, cfg.data.source, tokenizer, args.out, workers=args.workers, shard_docs=args.shard_docs,
                                progress=not args.quiet, text_field=data.text_field(cfg.data))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"interrupted: the same command goes on from the shards written so far in {args.out}", file=sys.stderr)
    return 130
  print(f"{args.out}: {index['documents']:,} documents, {index['tokens']:,} tokens; train with data.source=tokens:{args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
