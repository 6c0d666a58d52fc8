"""Model FLOPs per token and device peaks, for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from lm.config import ModelConfig, head_dim
from lm.model import count_params

# Dense bfloat16 peak FLOP/s per chip, by the start of `device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6 x matmul parameters (the embedding lookup is free, a tied output projection is not)
  plus attention scores and values, as in the PaLM paper's MFU."""
  matmul_params = count_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  attention = 12 * cfg.num_layers * cfg.num_heads * head_dim(cfg) * seq_len
  return 6 * matmul_params + attention


def measure_matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
  """Best FLOP/s of square float32 matmuls on the first device."""
  best = 0.0
  for n in sizes:
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(x).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - start))
  return best


def peak_flops(devices: list[jax.Device]) -> float:
  """Peak FLOP/s of all devices in use. Simulated CPU devices share one machine, so its measured
  matmul peak counts once."""
  kind = devices[0].device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak * len(devices)
  return measure_matmul_peak()
