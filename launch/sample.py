"""Sample from a trained run: python -m launch.sample --workdir DIR (--prompt TEXT | --prompts FILE.jsonl) [mesh.KEY=VALUE ...]"""

from __future__ import annotations

import argparse
import os
import sys

from lm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lm-sample", description=__doc__, allow_abbrev=False)
  parser.add_argument("--workdir", required=True, help="a training run's work directory")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  source.add_argument("--prompts", help="JSON lines with a \"prompt\" field")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=16, help="slots: rows decoded together")
  parser.add_argument("--chunk", type=int, help="the most decode steps (speculative: rounds) per compiled call; a call ends when a row finishes, for its slot to be refilled (default: the config's sample.chunk, 16)")
  parser.add_argument("--logprobs", action="store_true", help="add per-token log-probabilities")
  parser.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                      help="also stop at this token id (repeatable; end-of-sequence always stops)")
  speculate = parser.add_mutually_exclusive_group()
  speculate.add_argument("--draft", metavar="DIR[:STEP]", help="speculative decoding: a smaller run on the same tokenizer proposes tokens")
  speculate.add_argument("--speculate", choices=["ngram"], help="speculative decoding by prompt lookup (no second model)")
  parser.add_argument("--draft-tokens", type=int, metavar="K", help="tokens proposed per speculative round (default 4)")
  parser.add_argument("--output", help="JSON lines, written as completions finish; a rerun resumes it")
  parser.add_argument("--quantize", metavar="int8", help="weight-only int8, computed from the checkpoint at load")
  parser.add_argument("--kv-cache", metavar="int8", help="an int8 key/value cache, one scale per token and head")
  parser.add_argument("overrides", nargs="*", metavar="mesh.KEY=VALUE", help="decode mesh settings, and sample.chunk")
  args = parser.parse_intermixed_args(argv)
  from absl import logging

  import jax

  from lm import distributed, jobs, kv_cache, speculative  # after argument parsing, so --help needs no jax
  from lm.formats import utf8  # what the shell passes of bytes that are not UTF-8 (lone surrogates) as '?'
  from lm.quantize import check as check_quantize
  from lm.sampler import Knobs, Sampler, check_sampling

  logging.set_verbosity(logging.ERROR)  # orbax's routine warnings are not the user's business

  sink = None
  try:
    distributed.initialize()
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples, args.seed)
    check_quantize(args.quantize)
    kv_cache.check(args.kv_cache)
    if args.batch_size < 1:
      raise ConfigError(f"--batch-size={args.batch_size} must be at least 1")
    if args.chunk is not None and args.chunk < 1:
      raise ConfigError(f"--chunk={args.chunk} must be at least 1")
    if args.draft_tokens is not None and not (args.draft or args.speculate):
      raise ConfigError(f"--draft-tokens={args.draft_tokens} needs --draft DIR or --speculate ngram")
    draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
    prompts = [utf8(p) for p in args.prompt] if args.prompt is not None else jobs.shared_prompts(args.prompts)
    sampler = Sampler.from_workdir(args.workdir, args.step, overrides=args.overrides, quantize=args.quantize,
                                   kv=args.kv_cache, sharing=[speculative.draft_model(args.draft)] if args.draft else [])
    if args.draft or args.speculate:
      proposer = speculative.load_draft(sampler, args.draft) if args.draft else speculative.Ngram()
      speculative.speculate(sampler, proposer, draft_tokens)
    requests = sampler.requests(prompts, args.num_samples, args.max_new_tokens)
    sampler.stops(args.stop_token)  # checked before an output file records them
    knobs = Knobs(args.temperature, args.top_k, args.top_p, args.seed)
    writer = jax.process_index() == 0  # every process samples its share; one writes
    out = sys.stdout if writer else None
    if args.output:
      settings = {"workdir": str(sampler.workdir), "step": sampler.step,
                  "prompts": jobs.prompts_digest(prompts), "num_samples": args.num_samples,
                  "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                  "top_p": args.top_p, "seed": args.seed, "stop_tokens": sorted(args.stop_token),
                  "logprobs": args.logprobs}
      if args.quantize:
        settings["quantize"] = args.quantize
      if args.kv_cache:
        settings["kv_cache"] = args.kv_cache
      if sampler.speculation:  # sampled tokens depend on the proposer (greedy ones do not, but one rule is simpler)
        draft = sampler.speculation.proposer.draft if args.draft else None
        proposer = f"draft {draft.workdir} step {draft.step}" if draft else args.speculate
        settings["speculate"] = f"{proposer}, {draft_tokens} tokens"
      out, done = jobs.open_output(args.output, settings, write=writer)
      requests = [r for r in requests if (r.index, r.sample) not in done]
    if writer:
      dtype = sampler.cfg.model.dtype
      print(f"mesh: {dict(sampler.mesh.shape)} ({args.quantize or dtype} weights, {args.kv_cache or dtype} KV cache); "
            f"{len(requests)} completions to make",
            file=sys.stderr)
    # A bar on the terminal that completions are printed to would run into them.
    progress = jobs.Progress(len(requests), sys.stderr, writer and sys.stderr.isatty() and not (out is sys.stdout and out.isatty()))
    t, sink = sampler.timing, jobs.Sink(out, args.output, args.num_samples > 1)
    for completion in sampler.run(requests, knobs, batch_size=args.batch_size, chunk=args.chunk,
                                  stop_tokens=args.stop_token, logprobs=args.logprobs, check=sink.check):
      sink.write(completion)
      if writer:
        progress.update(t.decode_tokens, t.decode_seconds)
  except ConfigError as e:
    if sink is not None and sink.reader_gone:  # `| head` has what it wanted: stop quietly, as a shell tool does
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's own last flush is quiet too
      return 141
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # every finished completion is already in the file
    kept = f": {args.output} holds the completions made so far; the same command makes the rest" if args.output else ""
    print(f"interrupted{kept}", file=sys.stderr)
    return 130
  if writer:
    print(f"prefill {t.prefill_tokens / max(t.prefill_seconds, 1e-9):,.0f} tokens/s | "
          f"decode {t.decode_tokens / max(t.decode_seconds, 1e-9):,.0f} kept tokens/s"
          + (f" (acceptance {t.accepted / max(t.proposed, 1):.0%}, {t.decode_tokens / max(t.target_passes, 1):.2f} tokens per target pass)"
             if sampler.speculation else "") + f" | compile {t.compile_seconds:.1f}s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
