"""Sampling throughput: python -m bench.sample_speed [--job-prompts 512] [--hf-new-tokens 128]

Job mode: 512 prompts of 8 to 256 tokens with --max-new-tokens 256, whose completions end at a
row-dependent point (a per-row budget standing in for a stop token), in two spreads of 10x: 25 to 256
tokens uniformly, and 16 to 160 tokens log-uniformly (most completions short, as when a stop token
usually comes early). Each is sampled with today's static batches (new prompts enter only when the
whole batch is done, and a batch runs all 256 decode steps) and with continuous batching, in one run
on the same model, 3 times each in turn (medians, and the range of the speed-ups of each pair). Tokens/s count kept tokens over the job's wall time, compiles excluded. "decode
steps bound" is the speed-up a free engine would get: static decode steps over the kept tokens per slot.

Decode mode: batch 1 and 16 greedy decode tokens/s against Hugging Face transformers' `generate` on
the same random Llama (float32, CPU), imported through lm.convert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from lm import config, sharding
from lm.convert import model_config, read_params
from lm.sampler import Knobs, Request, Sampler

LLAMA = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def imported_llama(tmp: str) -> tuple[Sampler, transformers.LlamaForCausalLM]:
  torch.manual_seed(0)
  theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  theirs.save_pretrained(tmp, safe_serialization=True)
  m = model_config(json.loads((Path(tmp) / "config.json").read_text()))
  cfg = config.Config(model=m, mesh=config.MeshConfig(data=1, fsdp=1, tensor=1))
  params = jax.device_put(read_params(Path(tmp), m), jax.devices()[0])
  return Sampler(cfg, params, None, sharding.make_mesh(cfg.mesh, jax.devices()[:1])), theirs


def timed_run(sampler: Sampler, requests: list[Request], **kwargs) -> tuple[int, float]:
  """Kept tokens and wall seconds of a job, compiles excluded."""
  sampler.timing = type(sampler.timing)()
  start = time.perf_counter()
  for _ in sampler.run(requests, Knobs(), **kwargs):
    pass
  return sampler.timing.decode_tokens, time.perf_counter() - start - sampler.timing.compile_seconds


def job_table(sampler: Sampler, prompts: int, batch: int, chunk: int, repeats: int, max_new: int = 256) -> None:
  """Medians of `repeats` runs of each batching, taken in turn (so a busy spell weighs on both), and
  the range of the speed-ups of each pair of runs."""
  rng = np.random.default_rng(0)
  ids = [rng.integers(3, 32000, rng.integers(8, 257)).tolist() for _ in range(prompts)]
  spreads = {"uniform 25-256": [25 + (i * 37) % 232 for i in range(prompts)],
             "log-uniform 16-160": np.round(16 * 10 ** rng.random(prompts)).astype(int).tolist()}
  modes = {"static": max_new, "continuous": 0}
  print(f"job: {prompts} prompts of 8-256 tokens, max_new_tokens {max_new}, {batch} slots, chunk {chunk}, "
        f"median of {repeats} runs of each\n")
  print("| completion lengths | batching | kept tokens | seconds | kept tokens/s | speed-up (range) | decode steps bound |")
  print("|---|---|---|---|---|---|---|")
  for spread, budgets in spreads.items():
    requests = [Request(i, 0, "", ids[i], budgets[i]) for i in range(prompts)]
    bound = -(-prompts // batch) * max_new / (sum(budgets) / batch)
    for static in modes.values():
      timed_run(sampler, requests[:batch], batch_size=batch, chunk=chunk, static=static)  # compiles
    seconds = {name: [] for name in modes}
    for _ in range(repeats):
      for name, static in modes.items():
        tokens, took = timed_run(sampler, requests, batch_size=batch, chunk=chunk, static=static)
        seconds[name].append(took)
    pairs = [s / c for s, c in zip(seconds["static"], seconds["continuous"])]
    median = {name: statistics.median(took) for name, took in seconds.items()}
    for name in modes:
      speed_up = f"{median['static'] / median[name]:.2f}x" + (f" ({min(pairs):.2f}-{max(pairs):.2f}x)" if name == "continuous" else "")
      print(f"| {spread} | {name} | {tokens:,} | {median[name]:.1f} | {tokens / median[name]:,.0f} | {speed_up} | "
            f"{f'{bound:.2f}x' if name == 'continuous' else ''} |", flush=True)


def hf_table(sampler: Sampler, theirs, prompt: int, new: int, chunk: int, repeats: int) -> None:
  """Medians of `repeats` runs of each, taken in turn, so load from other processes weighs on both alike."""
  print(f"\ndecode: prompt {prompt} tokens, {new} new tokens, greedy, float32 on CPU ({torch.get_num_threads()} torch threads), "
        f"median of {repeats} runs\n")
  print("| batch | ours tokens/s | transformers generate tokens/s | ratio |")
  print("|---|---|---|---|")
  rng = np.random.default_rng(1)
  for rows in (1, 16):
    ids = rng.integers(3, 32000, (rows, prompt))
    requests = [Request(i, 0, "", ids[i].tolist(), new) for i in range(rows)]
    inputs = torch.tensor(ids)

    def generate(n: int) -> float:
      start = time.perf_counter()
      with torch.no_grad():
        theirs.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, pad_token_id=0)
      return time.perf_counter() - start

    timed_run(sampler, requests, batch_size=rows, chunk=chunk)  # compiles
    generate(2)
    ours, hf = [], []
    for _ in range(repeats):
      timed_run(sampler, requests, batch_size=rows, chunk=chunk)
      ours.append(sampler.timing.decode_tokens / sampler.timing.decode_seconds)
      first = generate(1)  # the prefill and the first token
      hf.append(rows * (new - 1) / (generate(new) - first))
    ours_rate, hf_rate = statistics.median(ours), statistics.median(hf)
    print(f"| {rows} | {ours_rate:,.0f} | {hf_rate:,.0f} | {ours_rate / hf_rate:.2f}x |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--job-prompts", type=int, default=512)
  parser.add_argument("--job-batch", type=int, default=16)
  parser.add_argument("--job-chunk", type=int, default=config.SampleConfig().chunk,
                      help="the most decode steps per compiled call in job mode (a call ends when a row finishes)")
  parser.add_argument("--job-repeats", type=int, default=3, help="timed runs of each batching, taken in turn")
  parser.add_argument("--chunk", type=int, default=16, help="decode steps per compiled call in decode mode")
  parser.add_argument("--hf-prompt-tokens", type=int, default=64)
  parser.add_argument("--hf-new-tokens", type=int, default=128)
  parser.add_argument("--hf-repeats", type=int, default=3, help="timed decode runs of each, taken in turn")
  parser.add_argument("--skip-job", action="store_true")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    sampler, theirs = imported_llama(tmp)
  print(f"model: random Llama, 4 layers, width 256, 4 heads / 2 kv heads, vocab 32000; device: {jax.devices()[0].device_kind}\n")
  if not args.skip_job:
    job_table(sampler, args.job_prompts, args.job_batch, args.job_chunk, args.job_repeats)
  hf_table(sampler, theirs, args.hf_prompt_tokens, args.hf_new_tokens, args.chunk, args.hf_repeats)


if __name__ == "__main__":
  main()
