"""Speculative decoding speed: python -m bench.speculative_speed [--target DIR --draft DIR]

Greedy decode tokens/s at batch 1 and 8 for plain decoding, a draft run (about 1/20 of the target's
parameters, the target's tokenizer) and prompt lookup (ngram) on code prompts that quote their
context, with acceptance rates and the cost of one target pass of K+1 tokens relative to one of 1
token. Without work directories it first trains both on the built-in corpus (the standard library's
Python files) for `--train-steps` and `--draft-steps` steps.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lm import data, speculative
from lm.model import count_params
from lm.sampler import Sampler, window

ROOT = Path(__file__).resolve().parents[1]
TARGET = ["model.num_layers=8", "model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8", "model.d_ff=1536",
          "train.learning_rate=1.5e-3"]
DRAFT = ["model.num_layers=2", "model.d_model=192", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=512"]


def train(workdir: Path, model: list[str], steps: int, *extra: str) -> None:
  """Rows of 256 tokens, so every position a prompt and its continuation reach is trained."""
  cmd = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.yaml", "--workdir", str(workdir),
         "--sample-prompt=", f"train.steps={steps}", f"checkpoint.every={steps}", f"eval.every={steps}",
         "train.warmup_steps=50", "train.batch_size=4", "train.seq_len=256", *model, *extra]
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def code_prompts(sampler: Sampler, n: int, context: int) -> list[str]:
  """A stretch of a standard-library file, then its first lines again: the continuation quotes it."""
  docs = data.TextFiles(data.stdlib_files())
  tok, out, i = sampler.tokenizer, [], 0
  while len(out) < n:
    ids = tok.encode(docs[i * 7])
    i += 1
    if len(ids) >= context:
      text = tok.decode(ids[:context])
      out.append(text + "\n\n" + "\n".join(text.splitlines()[:2]))
  return out


def prose_prompts(sampler: Sampler, n: int, context: int) -> list[str]:
  docs = data.TextFiles(data.stdlib_files())
  return [sampler.tokenizer.decode(sampler.tokenizer.encode(docs[i * 11 + 3])[:context]) for i in range(n)]


def pass_cost(sampler: Sampler, rows: int, T: int, S: int, repeats: int = 15) -> float:
  """One target decode call of T new tokens per row over one of 1 token, against a cache of S slots
  half filled (attending to the window the engine would), updated in place as the engine's is:
  medians of interleaved calls, so load from other processes weighs on both alike."""
  cache = sampler.empty_state(rows, S)["cache"]

  def decode(t: int):
    def call(params, cache):
      model = nnx.merge(sampler.graphdef, params)
      positions = jnp.broadcast_to(S // 2 + jnp.arange(t), (rows, t))
      return model.decode(jnp.zeros((rows, t), jnp.int32), positions, cache, window(S // 2 + T, S))
    return jax.jit(call, donate_argnums=1)  # a copy of the cache per call would weigh on both alike

  calls, seconds = {t: decode(t) for t in (1, T)}, {1: [], T: []}
  for i in range(repeats + 1):  # the first round compiles
    for t, call in calls.items():
      start = time.perf_counter()
      _, cache = jax.block_until_ready(call(sampler.params, cache))
      if i:
        seconds[t].append(time.perf_counter() - start)
  return statistics.median(seconds[T]) / statistics.median(seconds[1])


def rates(samplers: dict[str, Sampler], prompts: list[str], rows: int, new_tokens: int, repeats: int
          ) -> dict[str, tuple[float, float, float]]:
  """Per sampler: median kept tokens/s over `repeats` compiled runs of every prompt through `rows`
  slots, taken in turn with the others (so load from other processes weighs on all alike), acceptance
  and tokens per target pass. Batch 1 too samples every prompt: one prompt's acceptance is luck."""
  kw = dict(max_new_tokens=new_tokens, batch_size=rows, chunk=8)
  per_second: dict[str, list[float]] = {name: [] for name in samplers}
  for sampler in samplers.values():
    sampler.generate(prompts[:rows], **kw)  # compiles
    sampler.timing = type(sampler.timing)()
  for _ in range(repeats):
    for name, sampler in samplers.items():
      decode_tokens, decode_seconds = sampler.timing.decode_tokens, sampler.timing.decode_seconds
      sampler.generate(prompts, **kw)
      per_second[name].append((sampler.timing.decode_tokens - decode_tokens) / (sampler.timing.decode_seconds - decode_seconds))
  out = {}
  for name, sampler in samplers.items():
    t = sampler.timing
    per_pass = t.decode_tokens / t.target_passes if t.target_passes else 1.0  # kept tokens; plain: one a pass
    out[name] = statistics.median(per_second[name]), t.accepted / max(t.proposed, 1), per_pass
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--target", help="the target run's work directory (default: train one)")
  parser.add_argument("--draft", help="the draft run's work directory, same tokenizer (default: train one)")
  parser.add_argument("--train-steps", type=int, default=300, help="the target's training steps")
  parser.add_argument("--draft-steps", type=int, help="the draft's training steps (default: --train-steps)")
  parser.add_argument("--draft-tokens", type=int, default=4)
  parser.add_argument("--new-tokens", type=int, default=96)
  parser.add_argument("--prompt-tokens", type=int, default=96)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per decoding, taken in turn")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    target_dir, draft_dir = Path(args.target or f"{tmp}/target"), Path(args.draft or f"{tmp}/draft")
    if not args.target:
      train(target_dir, TARGET, args.train_steps)
    if not args.draft:
      train(draft_dir, DRAFT, args.draft_steps or args.train_steps, f"tokenizer.path={target_dir / 'tokenizer.model'}")
    target = Sampler.from_workdir(target_dir)
    draft = speculative.load_draft(target, str(draft_dir))
  K = args.draft_tokens
  S = target.cfg.model.max_seq_len
  print(f"target {count_params(target.cfg.model) / 1e6:.1f}M parameters, draft {count_params(draft.draft.cfg.model) / 1e6:.2f}M; "
        f"K={K} guesses per round; prompts {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; "
        f"device: {jax.devices()[0].device_kind}\n")
  print("| batch | decoding | prompts | tokens/s | speed-up | acceptance | tokens per target pass |")
  print("|---|---|---|---|---|---|---|")
  code, prose = code_prompts(target, 8, args.prompt_tokens), prose_prompts(target, 8, args.prompt_tokens)
  costs = {}
  for rows in (1, 8):
    for name, prompts in (("prose", prose), ("code", code)):
      samplers = {"plain": Sampler(target.cfg, target.params, target.tokenizer, target.mesh)}
      for label, proposer in (("draft", draft), ("ngram", speculative.Ngram())):
        samplers[label] = Sampler(target.cfg, target.params, target.tokenizer, target.mesh)
        speculative.speculate(samplers[label], proposer, K)
      measured = rates(samplers, prompts, rows, args.new_tokens, args.repeats)
      base = measured["plain"][0]
      for label, (tps, acceptance, per_pass) in measured.items():
        kept = f"{acceptance:.0%}" if label != "plain" else ""
        print(f"| {rows} | {label} | {name} | {tps:,.1f} | {tps / base:.2f}x | {kept} | {per_pass:.2f} |")
    costs[rows] = pass_cost(target, rows, K + 1, S)
  print("\ncost of one target pass of K+1 tokens relative to one of 1 token: "
        + ", ".join(f"batch {rows}: {c:.2f}x" for rows, c in costs.items()))


if __name__ == "__main__":
  main()
