"""Hugging Face Llama-family checkpoints to and from our runs.

`from_hf` reads config.json, safetensors weights (one file or shards) and tokenizer.model, and writes a
work directory as a fresh run would leave it at step 0. `to_hf` writes the files that
`transformers.LlamaForCausalLM.from_pretrained` loads. Our rotary embedding rotates the two halves of
each head like transformers' `rotate_half`, so q and k need no permutation; both RMSNorms multiply by
the scale itself (not 1 + scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lm import config, data
from lm.checkpoint import Checkpoints, open_run, run_meta, run_tokenizer
from lm.config import Config, ConfigError, ModelConfig, head_dim
from lm.files import writable_dir
from lm.params import abstract_model
from lm.tokenizer import Tokenizer
from lm.train import TrainState, decay_mask, optimizer

FAMILIES = ("llama", "mistral")  # the model types whose every setting we can check and represent
SHARD_BYTES = 2 << 30  # per exported file: each is built whole in memory before it is written
# Tensors of layer i (under model.layers.i.): our name under blocks/, and how many leading axes of
# ours are the input; 0: copied as is. torch Linear weights are [out, in], ours [in..., out...].
LAYER = {
    "input_layernorm.weight": ("attn_norm", 0),
    "self_attn.q_proj.weight": ("wq", 1),
    "self_attn.k_proj.weight": ("wk", 1),
    "self_attn.v_proj.weight": ("wv", 1),
    "self_attn.o_proj.weight": ("wo", 2),
    "post_attention_layernorm.weight": ("mlp_norm", 0),
    "mlp.gate_proj.weight": ("w_gate", 1),
    "mlp.up_proj.weight": ("w_up", 1),
    "mlp.down_proj.weight": ("w_down", 1),
}
Slot = tuple[str, int | None, int]  # our flat parameter name, layer (None: not stacked), input axes


def _require(hf: dict[str, Any], key: str) -> Any:
  if hf.get(key) is None:
    raise ConfigError(f"'{key}' is missing")
  return hf[key]


def _unsupported(hf: dict[str, Any]) -> None:
  """Settings that would make our model compute something else fail here, naming the field."""
  # transformers' Mistral attends over 4096 positions where its config.json does not say
  window = hf.get("sliding_window", 4096 if hf.get("model_type") == "mistral" else None)
  checks = [
      ("model_type", hf.get("model_type"), hf.get("model_type") in FAMILIES, f"supported: {', '.join(FAMILIES)}"),
      ("hidden_act", hf.get("hidden_act"), hf.get("hidden_act", "silu") == "silu", "valid: \"silu\" (our MLP is SwiGLU)"),
      ("attention_bias", hf.get("attention_bias"), not hf.get("attention_bias"), "valid: false (our attention has no biases)"),
      ("mlp_bias", hf.get("mlp_bias"), not hf.get("mlp_bias"), "valid: false (our MLP has no biases)"),
      ("sliding_window", window, window is None, "valid: null (we attend over the whole context)"),
      ("tie_word_embeddings", hf.get("tie_word_embeddings"), isinstance(hf.get("tie_word_embeddings", False), bool),
       "valid: true or false"),  # bool("false") is True; transformers refuses it
  ]
  for field in ("rope_scaling", "rope_parameters"):  # transformers before and since v5
    rope = hf.get(field) or {}
    plain = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) == "default"
    checks.append((field, hf.get(field), plain, "valid: null or an object with rope_type \"default\" (plain rotary embeddings)"))
  for field, value, ok, valid in checks:
    if not ok:
      raise ConfigError(f"{field}={json.dumps(value)}{'' if field in hf else ' (unset)'} is not supported; {valid}")


def model_config(hf: dict[str, Any]) -> ModelConfig:
  """Our model settings for a Hugging Face config.json."""
  _unsupported(hf)
  d_model, heads = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
  # transformers' order: a rope_scaling object stands for rope_parameters, and its theta comes before the top-level one
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  rope_theta = next((t for t in (rope.get("rope_theta"), hf.get("rope_theta")) if t is not None), 10000.0)
  kv_heads_unset = 8 if hf.get("model_type") == "mistral" else None  # transformers' MistralConfig default
  # head_dim stays 0 where it is the derived value, so the config compares equal to one that omits it.
  explicit_head_dim = hf.get("head_dim") or 0
  return ModelConfig(
      vocab_size=_require(hf, "vocab_size"), num_layers=_require(hf, "num_hidden_layers"),
      d_model=d_model, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", kv_heads_unset) or heads,
      head_dim=0 if explicit_head_dim * heads == d_model else explicit_head_dim,
      d_ff=_require(hf, "intermediate_size"), max_seq_len=_require(hf, "max_position_embeddings"),
      rope_theta=float(rope_theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=hf.get("tie_word_embeddings", False))


def hf_config(m: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "head_dim": head_dim(m), "max_position_embeddings": m.max_seq_len,
      "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
      "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
      "eos_token_id": tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
  }


def slots(m: ModelConfig) -> dict[str, Slot]:
  """Where each Hugging Face tensor lives among our parameters."""
  out = {"model.embed_tokens.weight": ("embed", None, 0), "model.norm.weight": ("final_norm", None, 0)}
  if not m.tie_embeddings:
    out["lm_head.weight"] = ("unembed", None, 1)
  for i in range(m.num_layers):
    out |= {f"model.layers.{i}.{suffix}": (f"blocks/{name}", i, n_in) for suffix, (name, n_in) in LAYER.items()}
  return out


def torch_shape(shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
  return shape if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_torch(x: np.ndarray, n_in: int) -> np.ndarray:
  return x if n_in == 0 else np.ascontiguousarray(x.reshape(torch_shape(x.shape, n_in)[::-1]).T)


def _weight_files(hf_dir: Path) -> list[Path]:
  index = hf_dir / "model.safetensors.index.json"
  if index.is_file():
    try:
      names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
      raise ConfigError(f"'{index}' is not a safetensors index (a \"weight_map\" of tensor names to files)") from None
    if missing := [name for name in names if not (hf_dir / name).is_file()]:
      raise ConfigError(f"'{hf_dir}' lacks {missing[0]}, one of the {len(names)} weight files its index names "
                        f"({len(missing)} missing); download it again")
    return [hf_dir / name for name in names]
  if (hf_dir / "model.safetensors").is_file():
    return [hf_dir / "model.safetensors"]
  raise ConfigError(f"'{hf_dir}' has neither model.safetensors nor model.safetensors.index.json; only safetensors weights are read")


def _tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of every file, one at a time, as float32 (bfloat16 arrives through ml_dtypes)."""
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          yield name, f.get_tensor(name).astype(np.float32, copy=False)
    except SafetensorError as e:  # a download cut short, most often
      raise ConfigError(f"'{file}' is not a readable safetensors file ({e}); download it again") from None


def read_params(hf_dir: Path, m: ModelConfig) -> dict[str, Any]:
  """Our parameters, filled one source tensor at a time into preallocated stacked float32 arrays.
  Peak host memory: the float32 model plus the largest source tensor, twice if it is not float32 (a
  tied model's lm_head, if saved, is held until the end: the untied model's size)."""
  _, abstract = abstract_model(m)
  flat = {k: np.empty(v.shape, np.float32)
          for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(abstract), sep="/").items()}
  todo, head = slots(m), None
  for name, w in _tensors(_weight_files(hf_dir)):
    if name.endswith("rotary_emb.inv_freq"):
      continue  # derived from rope_theta: transformers ignores it too
    if name == "lm_head.weight" and m.tie_embeddings:
      head = w  # transformers ties it only where it equals the embedding, which may come later
      continue
    if name not in todo:
      raise ConfigError(f"{hf_dir}: tensor '{name}' has no place in our Llama model (biases and extra weights are not supported)")
    key, layer, n_in = todo.pop(name)
    target = flat[key] if layer is None else flat[key][layer]
    if w.shape != (want := torch_shape(target.shape, n_in)):
      raise ConfigError(f"{hf_dir}: tensor '{name}' has shape {list(w.shape)}; config.json implies {list(want)}")
    if n_in == 0:
      target[...] = w
    else:  # torch's [out, in] into a 2-D view of our [in..., out...]: no transposed copy
      target.reshape(w.shape[::-1])[...] = w.T
  if todo:
    raise ConfigError(f"{hf_dir}: tensor '{next(iter(todo))}' is missing ({len(todo)} of {len(slots(m))} missing)")
  if head is not None and not np.array_equal(head, flat["embed"]):
    raise ConfigError(f"{hf_dir}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', yet config.json says "
                      f"tie_word_embeddings=true (transformers then unties them); set it to false to import the head")
  return traverse_util.unflatten_dict(flat, sep="/")


def _added_tokens(hf_dir: Path) -> Iterator[tuple[int, str, Path]]:
  """(id, text, file) of each token transformers adds to tokenizer.model's pieces."""
  for path in (hf_dir / "tokenizer_config.json", hf_dir / "added_tokens.json"):
    if not path.is_file():
      continue
    try:
      found = json.loads(path.read_text())
      if path.name == "tokenizer_config.json":
        yield from ((int(i), t["content"], path) for i, t in found.get("added_tokens_decoder", {}).items())
      else:
        yield from ((int(i), t, path) for t, i in found.items())
    except (ValueError, KeyError, TypeError, AttributeError):
      raise ConfigError(f"'{path}' is not a tokenizer file transformers reads (JSON with added tokens and their ids)") from None


def _check_new(path: Path, what: str) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise ConfigError(f"{what} '{path}' already exists and is not an empty directory; choose a new one")


def _writing(path: Path, write: Callable[[], Any]) -> Any:
  """A write that fails for want of space or access is one line, naming the directory it left in part."""
  try:
    return write()
  except OSError as e:
    raise ConfigError(f"writing '{path}' failed ({e.strerror or e}); it holds part of the conversion: remove it, then rerun") from None


def run_config(m: ModelConfig, tokenizer: Tokenizer) -> Config:
  cfg = Config(model=m)
  cfg.tokenizer.vocab_size = tokenizer.vocab_size
  cfg.train.seq_len = min(cfg.train.seq_len, m.max_seq_len)
  config.validate(cfg)
  return cfg


def write_run(workdir: Path, cfg: Config, params: dict[str, Any], tokenizer: Path) -> None:
  """What a fresh run would leave at step 0: the checkpoint (parameters, a fresh optimizer, the data
  position, meta), tokenizer.model and config.yaml. Saving adds no host copy of `params` (see
  lm.checkpoint), and the zero moments are never written to, so their pages stay unallocated."""
  workdir.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(tokenizer, workdir / "tokenizer.model")
  tok = Tokenizer(workdir / "tokenizer.model")
  config.save(cfg, workdir / "config.yaml")
  _, abstract = abstract_model(cfg.model)
  tx = optimizer(cfg.train, decay_mask(abstract))
  # A fresh AdamW state is all zeros: step counts and both moments.
  opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))
  state = TrainState(step=np.zeros((), np.int32), params=params, opt_state=opt_state)
  meta = run_meta(config.to_dict(cfg), tok.path)
  t = cfg.train
  data_iter = iter(data.batches(data.split(cfg.data)[0], tok, seq_len=t.seq_len, global_batch=t.batch_size, seed=t.seed,
                                shuffle_window=data.shuffle_window(cfg.data, t.batch_size, t.seq_len), workers=cfg.data.workers))
  ckpts = Checkpoints(workdir / "checkpoints")
  try:
    ckpts.save(0, state, data_iter, meta)
  finally:
    ckpts.close()
    data_iter.close()


def from_hf(hf_dir: str | Path, workdir: str | Path) -> Config:
  """Converts a Hugging Face model directory into a new work directory; returns its config."""
  hf_dir, workdir = Path(hf_dir), Path(workdir)
  where = hf_dir / "config.json"
  if not where.is_file():
    raise ConfigError(f"'{hf_dir}' is not a Hugging Face model directory: it has no config.json")
  _check_new(workdir, "work directory")
  try:
    hf = json.loads(where.read_text())
    if not isinstance(hf, dict):
      raise ConfigError(f"expected a JSON object of settings, not {type(hf).__name__}")
    m = model_config(hf)
    config.from_dict({"model": dataclasses.asdict(m)})  # each value of the type and range our settings take
  except json.JSONDecodeError as e:
    raise ConfigError(f"{where} is not valid JSON ({e.msg} at line {e.lineno})") from None
  except (ConfigError, TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None
  if not (hf_dir / "tokenizer.model").is_file():
    raise ConfigError(f"'{hf_dir}' has no tokenizer.model; we read sentencepiece tokenizers only")
  tokenizer = Tokenizer(hf_dir / "tokenizer.model")
  if tokenizer.vocab_size > m.vocab_size:
    raise ConfigError(f"{tokenizer.path} has {tokenizer.vocab_size} pieces, more than {where}'s vocab_size={m.vocab_size}")
  # Sequences start and stop at the tokenizer's ids: a model that ends with a token added beyond its
  # pieces (a chat template's) would never stop.
  for key, ours in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
    if (theirs := hf.get(key)) is not None and ours not in (theirs if isinstance(theirs, list) else [theirs]):
      raise ConfigError(f"{where}: {key}={json.dumps(theirs)} is not {tokenizer.path.name}'s ({ours}); we start and stop "
                        f"sequences at the tokenizer's ids, so such a model is not supported")
  # Added tokens within the pieces (Llama's <s>, </s>, <unk>) are pieces; others encode text as one id.
  if beyond := sorted((a for a in _added_tokens(hf_dir) if a[0] >= tokenizer.vocab_size), key=lambda a: a[0]):
    i, text, path = beyond[0]
    raise ConfigError(f"{path}: added token {json.dumps(text)} (id {i}) is not one of {tokenizer.path.name}'s {tokenizer.vocab_size} "
                      f"pieces; we read tokenizer.model's pieces only, so such a model is not supported")
  # transformers' generate stops at each id listed, ours at the tokenizer's; ids past the pieces are never sampled.
  eos = hf.get("eos_token_id")
  stops = [t for t in eos if t != tokenizer.eos_id and t in range(tokenizer.vocab_size)] if isinstance(eos, list) else []
  cfg = run_config(m, tokenizer)
  writable_dir(workdir, "work directory")  # after the checks (a refusal leaves no directory), before the weights are read
  params = read_params(hf_dir, m)
  _writing(workdir, lambda: write_run(workdir, cfg, params, tokenizer.path))
  if stops:
    print(f"note: config.json's eos_token_id also lists {', '.join(map(str, stops))}: pass "
          f"{' '.join(f'--stop-token {t}' for t in stops)} to lm-sample to stop there as transformers does", flush=True)
  return cfg


def write_tensors(out: Path, params: dict[str, Any], m: ModelConfig, shard_bytes: int) -> None:
  """model.safetensors, or shards of at most `shard_bytes` (or one tensor) and their index. Peak
  host memory beyond the parameters: one shard."""
  flat = traverse_util.flatten_dict(params, sep="/")
  where = slots(m)
  shards, size = [[]], 0
  for name, (key, layer, _) in where.items():
    nbytes = (flat[key] if layer is None else flat[key][layer]).nbytes
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
  for names, file in zip(shards, files):
    tensors = {}
    for name in names:
      key, layer, n_in = where[name]
      tensors[name] = to_torch(flat[key] if layer is None else flat[key][layer], n_in)
    save_file(tensors, out / file, metadata={"format": "pt"})
  if len(files) > 1:
    index = {"metadata": {"total_size": sum(x.nbytes for x in flat.values())},
             "weight_map": {name: file for names, file in zip(shards, files) for name in names}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def to_hf(workdir: str | Path, out: str | Path, step: int | None = None, shard_bytes: int = SHARD_BYTES) -> int:
  """Writes a run's checkpoint (the newest, or `step`) as a new Hugging Face Llama directory; returns
  the step."""
  workdir, out = Path(workdir), Path(out)
  _check_new(out, "output directory")
  ckpts, step, meta = open_run(workdir, step)
  try:
    cfg = config.from_dict(meta["config"])
    if cfg.model.d_model % cfg.model.num_heads:
      raise ConfigError(f"transformers' Llama needs a width that is a multiple of the heads, not model.d_model={cfg.model.d_model} "
                        f"over model.num_heads={cfg.model.num_heads}; this run cannot be exported")
    tokenizer = Tokenizer(run_tokenizer(workdir, step, meta))
    writable_dir(out, "output directory")  # after the checks (a refusal leaves no directory), before the weights are read
    _, abstract = abstract_model(cfg.model)
    # numpy targets restore as numpy arrays: no device memory, and no second host copy through jax.
    targets = jax.tree.map(lambda v: np.empty(v.shape, v.dtype), nnx.to_pure_dict(abstract))
    params = ckpts.restore_params(step, targets)
  finally:
    ckpts.close()
  _writing(out, lambda: write_hf(out, cfg.model, tokenizer, params, shard_bytes))
  return step


def tokenizer_config(tokenizer: Tokenizer, m: ModelConfig) -> dict[str, Any]:
  """How transformers should encode text as we trained on it: a BOS id first (it adds none without
  this file), and a space put in front only where the sentencepiece model does so (ours do not;
  LlamaTokenizer would by default)."""
  piece = lambda i: tokenizer.sp.id_to_piece(i) if i >= 0 else None
  prefix = tokenizer.sp.encode("a", out_type=str)[0].startswith("\u2581")  # its dummy prefix, "▁"
  return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": tokenizer.bos_id >= 0, "add_eos_token": False,
          "add_prefix_space": prefix, "bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
          "unk_token": piece(tokenizer.sp.unk_id()), "model_max_length": m.max_seq_len}


def write_hf(out: Path, m: ModelConfig, tokenizer: Tokenizer, params: dict[str, Any], shard_bytes: int) -> None:
  (out / "config.json").write_text(json.dumps(hf_config(m, tokenizer), indent=2))
  shutil.copyfile(tokenizer.path, out / "tokenizer.model")
  (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, m), indent=2))
  write_tensors(out, params, m, shard_bytes)
