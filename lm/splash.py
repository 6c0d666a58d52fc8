"""Splash attention, the Pallas TPU kernel MaxText trains with: causal attention within documents,
computed block by block so no [L, L] score matrix exists in the forward or the backward pass.
Off TPU the same kernel runs in Pallas' interpreter (slow; it is how tests check it on CPU)."""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from lm import sharding

BLOCKS = (512, 256, 128)  # tiles to try, largest first: 512 is MaxText's default for long sequences


def applies(batch: int, seq_len: int, num_heads: int, num_kv_heads: int) -> bool:
  """Whether the kernel can run this attention on the current mesh: whole tiles, rows that split
  evenly, and query heads that stay with their key/value heads when split."""
  if seq_len % BLOCKS[-1]:
    return False
  if (context := sharding.current()) is None:
    return True
  mesh, rules = context
  heads, kv_heads = sharding.spec(("heads",), rules), sharding.spec(("kv_heads",), rules)
  shards = sharding.shards(mesh, heads[0])
  return (heads == kv_heads and num_heads % shards == 0 and num_kv_heads % shards == 0
          and batch % sharding.data_parallel_size(mesh, rules) == 0)


def attend(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
  """Causal grouped-query attention within documents (equal segment ids); the softmax runs in float32."""
  L, H = q_BxLxNxH.shape[1], q_BxLxNxH.shape[3]
  block = next(b for b in BLOCKS if L % b == 0)
  sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  interpret = sharding.platform() != "tpu"

  def local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL):
    n = q_BxLxNxH.shape[2]
    kernel = kernels.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((L, L))] * n), block_sizes=sizes,
                                     head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: x.swapaxes(1, 2)
    out_BxNxLxH = jax.vmap(kernel)(heads_first(q_BxLxNxH * H**-0.5), heads_first(k_BxLxKxH), heads_first(v_BxLxKxH),
                                   segment_ids=kernels.SegmentIds(segment_ids_BxL, segment_ids_BxL))
    return heads_first(out_BxNxLxH)

  context = sharding.current()
  if context is None:
    return local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
  mesh, rules = context
  q_spec, kv_spec = sharding.spec(("batch", None, "heads", None), rules), sharding.spec(("batch", None, "kv_heads", None), rules)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, sharding.spec(("batch", None), rules)),
                       out_specs=q_spec, check_vma=False)(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)
