"""Llama-family decoder-only transformer in Flax NNX, with layers stacked and scanned (training) or
listed and run in turn (sampling)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from lm import kv_cache, splash
from lm.config import ModelConfig, head_dim
from lm.sharding import constrain, current, platform, shards, spec

Attention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (q, k, v) -> out, BxLxNxH

REMAT_POLICIES = {
    "full": None,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def dense(x: jax.Array, w: jax.Array | qwix.QArray, n_in: int = 1) -> jax.Array:
  """Contracts the last `n_in` axes of x with the first `n_in` axes of w (cast to x's dtype) as one
  2-D matmul: XLA's CPU backend runs N-D dots about half as fast, and other backends do not mind.
  An int8 w (lm.quantize) goes to `qwix.dot`, which rescales it to x's dtype for the matmul."""
  lead, outs = x.shape[: x.ndim - n_in], w.shape[n_in:]
  k = math.prod(w.shape[:n_in])
  matmul = qwix.dot if isinstance(w, qwix.QArray) else jnp.dot
  y = matmul(x.reshape(-1, k), w.astype(x.dtype).reshape(k, math.prod(outs)))
  return y.reshape(*lead, *outs)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding on the two halves of each head (the Hugging Face Llama layout)."""
  half = x_BxLxNxH.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xF = (positions_BxL[..., None].astype(jnp.float32) * freq_F)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xF), jnp.cos(angle_BxLx1xF)
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def attend(q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, mask_BxLxS: jax.Array) -> jax.Array:
  """Grouped-query attention; the softmax runs in float32."""
  return attend_heads_first(q_BxLxNxH, k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3), mask_BxLxS)


def attend_heads_first(q_BxLxNxH: jax.Array, k: kv_cache.Entry, v: kv_cache.Entry, mask_BxLxS: jax.Array) -> jax.Array:
  """`attend` on keys and values laid out as the matmuls read them (the decode cache's layout); int8
  ones (lm.kv_cache) scale the scores and the probabilities by their slots' scales."""
  B, L, N, H = q_BxLxNxH.shape
  k_BxKxSxH, k_scale_BxKxS = kv_cache.parts(k, q_BxLxNxH.dtype)
  v_BxKxSxH, v_scale_BxKxS = kv_cache.parts(v, q_BxLxNxH.dtype)
  K, S = k_BxKxSxH.shape[1:3]
  G = N // K
  q_BxKxGxLxH = q_BxLxNxH.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4)
  k_BxKxHxS = k_BxKxSxH.swapaxes(-1, -2)
  # One query per head (decoding) on a CPU: a matrix-vector product per head reads the keys and values
  # where they lie, where one matmul of the G heads sharing them first copies them into tiles.
  per_head = L == 1 and G > 1 and platform() == "cpu"
  if per_head:
    logits_BxKxGxLxS = jnp.stack([jnp.matmul(q_BxKxGxLxH[:, :, g], k_BxKxHxS, preferred_element_type=jnp.float32)
                                  for g in range(G)], axis=2)
  else:  # the heads that share a key/value head stacked along the query axis: one matmul per kv head
    logits = jnp.matmul(q_BxKxGxLxH.reshape(B, K, G * L, H), k_BxKxHxS, preferred_element_type=jnp.float32)
    logits_BxKxGxLxS = logits.reshape(B, K, G, L, S)
  if k_scale_BxKxS is not None:
    logits_BxKxGxLxS = logits_BxKxGxLxS * k_scale_BxKxS[:, :, None, None]
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS * H**-0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1)
  if v_scale_BxKxS is not None:
    probs = probs * v_scale_BxKxS[:, :, None, None]
  probs = probs.astype(v_BxKxSxH.dtype)
  if per_head:
    out_BxKxGxLxH = jnp.stack([jnp.matmul(probs[:, :, g], v_BxKxSxH) for g in range(G)], axis=2)
  else:
    out_BxKxGxLxH = jnp.matmul(probs.reshape(B, K, G * L, S), v_BxKxSxH).reshape(B, K, G, L, H)
  return out_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


def same_document(segment_ids_BxL: jax.Array) -> jax.Array:
  return segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]


def causal_segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Token l sees token s when s <= l and both belong to the same document."""
  L = segment_ids_BxL.shape[1]
  return jnp.tril(jnp.ones((L, L), bool)) & same_document(segment_ids_BxL)


def self_attention(cfg: ModelConfig, segment_ids_BxL: jax.Array) -> Attention:
  """Causal attention within documents: a fused kernel where it applies (asked for, or by default on
  its platform), else `attend`, saying once why the kernel did not apply."""
  kind = cfg.attention
  if kind == "auto":
    kind = {"tpu": "splash", "gpu": "cudnn"}.get(platform(), "xla")
  B, L = segment_ids_BxL.shape
  H = head_dim(cfg)
  if kind == "splash":
    if splash.applies(B, L, cfg.num_heads, cfg.num_kv_heads):
      return lambda q, k, v: splash.attend(q, k, v, segment_ids_BxL)
    fallback(kind, f"sequence length {L} is not a multiple of 128" if L % splash.BLOCKS[-1] else
             "the mesh splits query heads, key/value heads or rows unevenly for it")
  # cuDNN's flash attention runs on NVIDIA GPUs, with half-precision heads of at most 128 in multiples
  # of 8; its gradient, with a mask, takes even lengths only.
  if kind == "cudnn":
    why = (f"it runs on NVIDIA GPUs, not {platform()}" if platform() != "gpu" else
           f"it needs model.dtype=bfloat16, not {cfg.dtype}" if cfg.dtype != "bfloat16" else
           f"head_dim {H} is not a multiple of 8 up to 128" if H % 8 or H > 128 else
           f"sequence length {L} is odd" if L % 2 else None)
    if why is None:
      same_Bx1xLxL = same_document(segment_ids_BxL)[:, None]
      return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=same_Bx1xLxL, is_causal=True,
                                                          implementation="cudnn")
    fallback(kind, why)
  mask_BxLxL = causal_segment_mask(segment_ids_BxL)
  return lambda q, k, v: attend(q, k, v, mask_BxLxL)


@functools.cache
def fallback(kernel: str, reason: str) -> None:
  """Said once per process and reason, however often the model is traced."""
  if jax.process_index() == 0:
    print(f"attention: {kernel} does not apply ({reason}); using XLA attention", flush=True)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg), cfg.d_ff
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.cfg = cfg
    self.attn_norm = nnx.Param(jnp.ones((D,)), axes=("embed",))
    self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std)
    self.wk = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std)
    self.wv = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std)
    self.wo = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), out_std)
    self.mlp_norm = nnx.Param(jnp.ones((D,)), axes=("embed",))
    self.w_gate = param(rngs, (D, F), ("embed", "mlp"), std)
    self.w_up = param(rngs, (D, F), ("embed", "mlp"), std)
    self.w_down = param(rngs, (F, D), ("mlp", "embed"), out_std)

  def qkv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    theta = self.cfg.rope_theta
    h = rms_norm(x_BxLxD, self.attn_norm[...], self.cfg.norm_eps)
    q = rope(dense(h, self.wq[...]), positions_BxL, theta)
    k = rope(dense(h, self.wk[...]), positions_BxL, theta)
    v = dense(h, self.wv[...])
    return (constrain(q, ("batch", None, "heads", None)), constrain(k, ("batch", None, "kv_heads", None)),
            constrain(v, ("batch", None, "kv_heads", None)))

  def finish(self, x_BxLxD: jax.Array, attn_BxLxNxH: jax.Array) -> jax.Array:
    """Attention output projection, residual, then the SwiGLU MLP and its residual."""
    x_BxLxD = x_BxLxD + dense(attn_BxLxNxH, self.wo[...], n_in=2)
    x_BxLxD = constrain(x_BxLxD, ("batch", None, "embed_act"))
    h = rms_norm(x_BxLxD, self.mlp_norm[...], self.cfg.norm_eps)
    up = constrain(jax.nn.silu(dense(h, self.w_gate[...])) * dense(h, self.w_up[...]), ("batch", None, "mlp"))
    return constrain(x_BxLxD + dense(up, self.w_down[...]), ("batch", None, "embed_act"))

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, attention: Attention) -> jax.Array:
    return self.finish(x_BxLxD, attention(*self.qkv(x_BxLxD, positions_BxL)))


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stacked: bool = True):
    """`stacked`: the blocks' weights stacked along a leading layer axis and scanned (training, and
    checkpoints); else a list of blocks run one after another (sampling, see `decode`)."""
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
    if stacked:
      self.blocks = self._stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.Param(jnp.ones((cfg.d_model,)), axes=("embed",))
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

  @staticmethod
  def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs)

    blocks = make(rngs)
    for _, var in nnx.iter_graph(blocks):
      if isinstance(var, nnx.Param):
        var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
    return blocks

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.cfg.dtype)

  def embed_tokens(self, tokens_BxL: jax.Array, one_hot: bool = False) -> jax.Array:
    if one_hot:
      # For a few tokens (decoding) with the table split along the vocabulary: a one-hot matmul
      # leaves the table where it is and sums the shards' partial rows, where a lookup would gather it.
      table_VxD = constrain(self.embed[...].astype(self.dtype), ("vocab", "embed"))
      hot = constrain(jax.nn.one_hot(tokens_BxL, table_VxD.shape[0], dtype=self.dtype), ("batch", None, "vocab"))
      return constrain(dense(hot, table_VxD), ("batch", None, "embed_act"))
    # Whole along the vocabulary (a lookup across vocab shards XLA can only do by replicating), but
    # still split along the width: each chip looks up a slice of every row, then the rows are regrouped.
    table_VxD = self.embed[...].astype(self.dtype)
    lookup = lambda rows, axes: jnp.take(constrain(rows, axes), tokens_BxL, axis=0)
    if isinstance(table_VxD, qwix.QArray):  # int8 (lm.quantize): each row's values and its scale
      x = qwix.dequantize(qwix.QArray(lookup(table_VxD.qvalue, (None, "embed")), lookup(table_VxD.scale, (None, None))))
    else:
      x = lookup(table_VxD, (None, "embed"))
    return constrain(x, ("batch", None, "embed_act"))

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    h = rms_norm(x_BxLxD, self.final_norm[...], self.cfg.norm_eps)
    w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
    # Written in the compute dtype, as MaxText does: the [B, L, vocab] buffer is the step's largest
    # activation. The softmax and the loss read it in float32.
    logits = dense(h, w_DxV).astype(jnp.float32)
    return constrain(logits, ("batch", None, "vocab"))

  def _layers(self, carry: Any, layer: Callable, per_layer: Sequence | None = None) -> tuple[Any, Any]:
    """Runs `layer(block, carry, input) -> (carry, per_layer_output)` over the blocks, `input` the
    layer's item of `per_layer` (None without it): a scan over stacked ones (outputs stacked along a
    leading layer axis), a loop over a list (outputs listed), each listed layer's weights held back
    until the layer before starts (`held_back`)."""
    if isinstance(self.blocks, nnx.List):
      blocks = list(self.blocks)
      outputs = []
      for i, item in zip(range(len(blocks)), [None] * len(blocks) if per_layer is None else per_layer, strict=True):
        if i + 1 < len(blocks):
          carry, blocks[i + 1] = held_back(carry, blocks[i + 1])
        carry, out = layer(blocks[i], carry, item)
        outputs.append(out)
      return carry, outputs
    graphdef, stacked = nnx.split(self.blocks)

    def step(carry, xs):
      block_state, item = xs
      return layer(nnx.merge(graphdef, block_state), carry, item)

    if self.cfg.remat != "none":
      step = jax.checkpoint(step, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (stacked, per_layer))

  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None) -> jax.Array:
    B, L = tokens_BxL.shape
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((B, L), jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    attention = self_attention(self.cfg, segment_ids_BxL)
    x, _ = self._layers(self.embed_tokens(tokens_BxL), lambda block, x, _: (block(x, positions_BxL, attention), None))
    return self.logits(x)

  def prefill(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array) -> Any:
    """Every layer's keys and values, [B, L, kv_heads, head_dim] each (stacked along a leading layer
    axis, or listed, as the blocks are), and no logits: the sampler feeds a prompt's last token to
    its first decode step, so an insert reads no unembedding (at one row, most of its cost)."""
    attention = self_attention(self.cfg, segment_ids_BxL)

    def layer(block, x, _):
      q, k, v = block.qkv(x, positions_BxL)
      return block.finish(x, attention(q, k, v)), (k, v)

    _, kv = self._layers(self.embed_tokens(tokens_BxL), layer)
    return kv

  def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, cache: tuple[tuple[kv_cache.Entry, kv_cache.Entry], ...],
             window: int | None = None) -> tuple[jax.Array, tuple[tuple[kv_cache.Entry, kv_cache.Entry], ...]]:
    """Runs T new tokens against a key/value cache of S slots per layer, [B, kv_heads, S, head_dim]
    each (the layout attention reads without a transpose; float or int8, lm.kv_cache), slot s holding position s: writes their
    keys and values at their positions and attends causally to the first `window` slots (all S by
    default). Returns logits and the cache.

    The blocks must be listed (`stacked=False`): each layer's weights and cache are then buffers of
    their own that the matmuls read where they lie, where XLA:CPU copies a stacked layer's slices
    out first, reading them three times per step. Decoding is bound by those reads, so a caller
    whose positions all lie below a shorter window reads only that much."""
    if not isinstance(self.blocks, nnx.List):
      raise TypeError("Transformer.decode runs listed blocks: build the model with stacked=False")
    S = cache[0][0].shape[2]
    W = window or S
    visible_BxTxW = jnp.arange(W)[None, None] <= positions_BxT[..., None]

    def layer(block, x, layer_cache):
      q, k, v = block.qkv(x, positions_BxT)
      layer_cache = tuple(kv_cache.write_rows(c, positions_BxT, new) for c, new in zip(layer_cache, (k, v)))
      seen = layer_cache if W == S else tuple(kv_cache.first(c, W) for c in layer_cache)
      return block.finish(x, attend_heads_first(q, *seen, visible_BxTxW)), layer_cache

    x, new_cache = self._layers(self.embed_tokens(tokens_BxT, one_hot=vocab_split()), layer, cache)
    return self.logits(x), tuple(new_cache)


def held_back(carry: Any, block: Block) -> tuple[Any, Block]:
  """`block` with weights that wait for `carry`. Listed layers tie each layer's weights to the input
  of the layer before, so that where they are split over devices (an FSDP mesh) each layer's are
  gathered while the previous one runs, not all at once: a TPU schedules unrolled layers' gathers
  far ahead of use (7B sampling on v5e-16: 11 GB of temporaries per chip, 0.9 GB held back)."""
  graphdef, weights = nnx.split(block)
  carry, weights = jax.lax.optimization_barrier((carry, weights))
  return carry, nnx.merge(graphdef, weights)


def vocab_split() -> bool:
  """Whether the mesh being traced for splits the vocabulary axis."""
  ctx = current()
  return ctx is not None and shards(ctx[0], spec(["vocab"], ctx[1])[0]) > 1


def count_params(cfg: ModelConfig) -> int:
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
