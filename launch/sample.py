"""Sample from a trained run: python -m launch.sample --workdir DIR (--prompt TEXT | --prompts FILE.jsonl)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm.config import ConfigError


def read_prompts(path: str) -> list[str]:
  """One JSON object per line with a "prompt" string (a bare JSON string also works)."""
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"--prompts file '{path}' does not exist")
  prompts = []
  for lineno, line in enumerate(file.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    prompt = record.get("prompt") if isinstance(record, dict) else record
    if not isinstance(prompt, str):
      raise ConfigError(f"{path}:{lineno}: expected a \"prompt\" string")
    prompts.append(prompt)
  if not prompts:
    raise ConfigError(f"--prompts file '{path}' has no prompts")
  return prompts


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lm-sample", description=__doc__)
  parser.add_argument("--workdir", required=True, help="a training run's work directory")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt")
  source.add_argument("--prompts", help="JSON lines with a \"prompt\" field")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=16, help="rows per compiled batch")
  parser.add_argument("--logprobs", action="store_true", help="add per-token log-probabilities")
  parser.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                      help="also stop at this token id (repeatable; end-of-sequence always stops)")
  parser.add_argument("--output", help="write JSON lines here instead of standard output")
  parser.add_argument("--quantize", metavar="int8", help="weight-only int8, computed from the checkpoint at load")
  args = parser.parse_args(argv)
  from absl import logging

  import jax

  from lm import distributed
  from lm.quantize import check as check_quantize
  from lm.sampler import Sampler, check_sampling  # after argument parsing, so --help needs no jax

  logging.set_verbosity(logging.ERROR)  # orbax's routine warnings are not the user's business

  try:
    distributed.initialize()
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples)
    check_quantize(args.quantize)
    if args.output and Path(args.output).exists():
      raise ConfigError(f"--output '{args.output}' already exists; choose a new path")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    sampler = Sampler.from_workdir(args.workdir, args.step, quantize=args.quantize)
    completions = sampler.generate(
        prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
        logprobs=args.logprobs, stop_tokens=args.stop_token)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() != 0:  # every process sampled its share; one writes
    return 0
  rows = []
  for c in completions:
    row = {"prompt": c.prompt, "completion": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    rows.append(json.dumps(row | ({"logprobs": c.logprobs} if c.logprobs is not None else {})) + "\n")
  if args.output:
    Path(args.output).write_text("".join(rows))
  else:
    sys.stdout.writelines(rows)
  t = sampler.timing
  print(f"prefill {t.prefill_tokens / max(t.prefill_seconds, 1e-9):,.0f} tokens/s | "
        f"decode {t.decode_tokens / max(t.decode_seconds, 1e-9):,.0f} tokens/s | compile {t.compile_seconds:.1f}s",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
