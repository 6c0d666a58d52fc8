"""Model FLOPs per token and device peaks, for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig, head_dim
from lm.params import abstract_model, is_matrix, logical_axes

# Dense bfloat16 peak FLOP/s per JAX device (a chip; a TensorCore on TPU v2 and v3), by `device_kind`:
# the longest name that is the kind or starts it before a space or hyphen ("NVIDIA H100 80GB HBM3" is
# an SXM part, "NVIDIA H100 PCIe" is not; "NVIDIA A10" is not "NVIDIA A100" or "NVIDIA A10G").
PEAK_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that multiply activations: every matrix (norm scales are vectors), less an untied
  embedding table, which is a lookup (a tied one is also the output projection)."""
  _, abstract = abstract_model(cfg)
  sizes = jax.tree.map(lambda axes, v: v.size if is_matrix(axes) else 0,
                       logical_axes(abstract), nnx.to_pure_dict(abstract), is_leaf=lambda x: isinstance(x, tuple))
  return sum(jax.tree.leaves(sizes)) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6 x matmul parameters plus attention scores and values over the whole sequence (causal masking
  not discounted), as in the PaLM paper's MFU."""
  attention = 12 * cfg.num_layers * cfg.num_heads * head_dim(cfg) * seq_len
  return 6 * matmul_params(cfg) + attention


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


def device_peak(kind: str) -> float | None:
  names = [n for n in PEAK_FLOPS if kind == n or (kind.startswith(n) and kind[len(n)] in " -")]
  return PEAK_FLOPS[max(names, key=len)] if names else None


def peak_flops(devices: list[jax.Device]) -> float | None:
  """Peak FLOP/s of all devices in use, or None where their kind is not in PEAK_FLOPS. Simulated CPU
  devices share one machine, so its measured matmul peak counts once."""
  if devices[0].platform == "cpu":
    return measure_matmul_peak()
  peak = device_peak(devices[0].device_kind)
  return peak * len(devices) if peak else None
