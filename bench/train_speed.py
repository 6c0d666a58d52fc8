"""Training throughput and MFU on this machine: python -m bench.train_speed

MFU counts the model's FLOPs per token (6 x matmul parameters plus attention) against the peak of
the devices in use: on CPU, the best rate of a float32 matmul measured in this same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from lm import config, flops, sharding
from lm.model import count_params
from lm.train import Steps

SHAPES = {
    "tiny (configs/tiny.yaml)": ("configs/tiny.yaml", ["model.vocab_size=2048"]),
    "125M-shaped, width 384": ("configs/125m.yaml", [
        "model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.num_kv_heads=6", "model.d_ff=1536",
        "model.max_seq_len=256", "model.dtype=float32", "model.remat=none", "model.vocab_size=8192",
        "train.seq_len=256", "train.batch_size=8", "mesh.data=1"]),
}


def measure(cfg: config.Config, repeats: int) -> float:
  """Seconds per training step, best of `repeats` after a warm-up step."""
  steps = Steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = steps.init_state(0)
  B, L, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (B, L + 1)).astype(np.int32)
  batch = steps.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                             "segment_ids": np.ones((B, L), np.int32),
                             "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1))})
  state, m = steps.train_step(state, batch)
  m["loss"].block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    state, m = steps.train_step(state, batch)
    m["loss"].block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  peak = flops.measure_matmul_peak()
  print(f"device: {jax.devices()[0].device_kind} | measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
  print("| model | params | tokens/step | step (s) | tokens/s | GFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|")
  for name, (path, overrides) in SHAPES.items():
    cfg = config.load(path, overrides + ["mesh.data=1", "model.remat=none"])
    seconds = measure(cfg, args.repeats)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    rate = flops.flops_per_token(cfg.model, cfg.train.seq_len) * tokens / seconds
    print(f"| {name} | {count_params(cfg.model) / 1e6:.1f}M | {tokens} | {seconds:.3f} | {tokens / seconds:,.0f} | "
          f"{rate / 1e9:.1f} | {100 * rate / peak:.1f}% |")


if __name__ == "__main__":
  main()
