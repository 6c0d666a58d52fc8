"""Typed run configuration: YAML presets plus dotted `key=value` overrides."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import math
import typing
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


class ConfigError(ValueError):
  """A bad config key or value; the message is one line meant for the user."""


Fraction = Annotated[float, pydantic.Field(ge=0.0, le=1.0)]
Beta = Annotated[float, pydantic.Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, pydantic.Field(ge=0, lt=2**32)]


@dataclasses.dataclass
class ModelConfig:
  vocab_size: NonNegativeInt = 0  # 0: take it from the tokenizer
  num_layers: PositiveInt = 4
  d_model: PositiveInt = 256
  num_heads: PositiveInt = 4
  num_kv_heads: PositiveInt = 4
  head_dim: NonNegativeInt = 0  # 0: d_model // num_heads
  d_ff: PositiveInt = 768
  max_seq_len: PositiveInt = 256
  dtype: str = "float32"
  rope_theta: PositiveFloat = 10000.0
  norm_eps: PositiveFloat = 1e-6
  tie_embeddings: bool = True
  remat: str = "none"  # none | full | save_matmuls
  # splash: the Pallas TPU kernel where it applies (sequences a multiple of 128, heads that split
  # evenly; interpreted off TPU, for tests); cudnn: cuDNN flash attention on NVIDIA GPUs in bfloat16;
  # xla (and the fallback of both): scores materialized. auto: splash on TPU, cudnn on GPU.
  attention: str = "auto"  # auto | xla | splash | cudnn
  init_std: NonNegativeFloat = 0.02


@dataclasses.dataclass
class TrainConfig:
  steps: PositiveInt = 1000
  batch_size: PositiveInt = 16  # global, in sequences
  seq_len: PositiveInt = 256
  grad_accum: PositiveInt = 1
  learning_rate: NonNegativeFloat = 3e-3
  warmup_steps: NonNegativeInt = 100
  min_lr_ratio: Fraction = 0.1
  weight_decay: NonNegativeFloat = 0.1
  b1: Beta = 0.9
  b2: Beta = 0.95
  clip_norm: PositiveFloat = 1.0
  z_loss: NonNegativeFloat = 0.0
  seed: Seed = 0


@dataclasses.dataclass
class DataConfig:
  source: str = "stdlib"
  text_field: str = "text"
  val_source: str = ""
  val_fraction: float = 0.01
  shuffle_window: NonNegativeInt = 0  # packed rows of each row's stream shuffled together; 0: lm.data.shuffle_window
  workers: int = 0  # grain worker processes that read and tokenize (0: in the training process)
  # source -> weight; when set, replaces data.source and each source holds out its own val_fraction
  mixture: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TokenizerConfig:
  path: str = ""  # an existing sentencepiece .model; empty: train one into the workdir
  model_type: str = "bpe"  # bpe | unigram | char
  vocab_size: PositiveInt = 2048  # for char: an upper bound
  train_sentences: PositiveInt = 200000


@dataclasses.dataclass
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # data, fsdp and tensor are sizes within one slice; `data` also runs across slices (the slow
  # data-center network carries only the gradient reduction). 0: as many as the devices span.
  slices: int = 0
  rules: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {
      "batch": ["data", "fsdp"],
      "vocab": ["tensor"],
      "embed": ["fsdp"],
      "embed_act": [],
      "heads": ["tensor"],
      "kv_heads": ["tensor"],
      "mlp": ["tensor"],
      "head_dim": [],
      "layers": [],
  })


@dataclasses.dataclass
class EvalConfig:
  every: NonNegativeInt = 200  # 0: at the last step only
  steps: NonNegativeInt = 8  # 0: no evaluation


@dataclasses.dataclass
class CheckpointConfig:
  every: NonNegativeInt = 500  # 0: at the last step (and on a stop request) only
  keep: PositiveInt = 3  # the newest K checkpoints
  keep_every: NonNegativeInt = 0  # and every M-th step forever (0: none)


@dataclasses.dataclass
class LogConfig:
  every: NonNegativeInt = 10  # 0: at the last step only


@dataclasses.dataclass
class ProfileConfig:
  start_step: int = 10  # the first step traced (as logged: step 1 is the first, which compiles)
  steps: int = 0  # how many steps a jax.profiler trace in WORKDIR/profile covers; 0: none
  all_processes: bool = False  # every process writes its trace, not only process 0


@dataclasses.dataclass
class SampleConfig:
  chunk: PositiveInt = 16  # the most decode steps (speculative: rounds) per compiled call; lm-sample --chunk overrides it


@dataclasses.dataclass
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  log: LogConfig = dataclasses.field(default_factory=LogConfig)
  profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
  sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_matmuls"),
    "model.attention": ("auto", "xla", "splash", "cudnn"),
    "tokenizer.model_type": ("bpe", "unigram", "char"),
}


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
  """Every dotted leaf key with its declared type."""
  keys = {}
  for f in dataclasses.fields(cls):
    tp = typing.get_type_hints(cls, include_extras=True)[f.name]
    if dataclasses.is_dataclass(tp):
      keys.update(all_keys(tp, f"{prefix}{f.name}."))
    else:
      keys[prefix + f.name] = tp
  return keys


def _type_name(tp: Any) -> str:
  return str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", None) or str(tp)


@functools.cache
def _bounds(tp: Any) -> pydantic.TypeAdapter:
  return pydantic.TypeAdapter(tp)


def _coerce(key: str, value: Any, declared: Any) -> Any:
  tp = typing.get_args(declared)[0] if typing.get_origin(declared) is Annotated else declared
  origin = typing.get_origin(tp)
  ok = True
  if tp is bool:
    ok = isinstance(value, bool)
  elif tp is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif tp is float:
    try:  # YAML reads exponents without a dot, such as 3e-4, as strings
      value = float(value) if not isinstance(value, bool) else value
    except (TypeError, ValueError):
      pass
    ok = isinstance(value, float)
    if ok and not math.isfinite(value):
      raise ConfigError(f"config key '{key}' is {value}; it must be a finite number")
  elif tp is str:
    ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    value = str(value) if ok else value
  elif origin is dict and typing.get_args(tp)[1] is float:
    ok = isinstance(value, dict)
    if ok and (bad := {k: v for k, v in value.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf}):
      raise ConfigError(f"config key '{key}' weighs {bad}; weights must be positive numbers")
    value = {str(k): float(v) for k, v in value.items()} if ok else value
  elif origin is dict:  # logical axis -> mesh axes: a name, a list of names, or nothing
    ok = isinstance(value, dict) and all(v is None or isinstance(v, str) or
                                         (isinstance(v, list) and all(isinstance(a, str) for a in v)) for v in value.values())
    if ok:
      value = {k: [v] if isinstance(v, str) else list(v or []) for k, v in value.items()}
  if not ok:
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
  if key in CHOICES and value not in CHOICES[key]:
    raise ConfigError(f"config key '{key}' is {value!r}; valid: {', '.join(CHOICES[key])}")
  if declared is not tp:  # Annotated with bounds
    try:
      _bounds(declared).validate_python(value)
    except pydantic.ValidationError as e:
      raise ConfigError(f"config key '{key}' is {value!r}; it {e.errors()[0]['msg'].removeprefix('Input ')}") from None
  return value


def set_key(cfg: Config, key: str, value: Any, keys: dict[str, Any] | None = None) -> None:
  keys = keys or all_keys()
  if key not in keys:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid sections: {', '.join(f.name for f in dataclasses.fields(Config))}"
    raise ConfigError(f"unknown config key '{key}'{hint}")
  *path, leaf = key.split(".")
  node = cfg
  for p in path:
    node = getattr(node, p)
  value = _coerce(key, value, keys[key])
  if key == "mesh.rules":  # rule tables merge, so one rule can be overridden alone
    known = getattr(node, leaf)
    for name in value.keys() - known.keys():
      close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
      raise ConfigError(f"{key} has no logical axis '{name}'{f'; did you mean {close[0]}?' if close else ''} (valid: {', '.join(known)})")
    value = {**known, **value}
  setattr(node, leaf, value)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in d.items():
    name = prefix + str(k)
    if isinstance(v, dict) and name not in ("mesh.rules", "data.mixture"):
      flat.update(flatten(v, name + "."))
    else:
      flat[name] = v
  return flat


class UniqueKeys(yaml.SafeLoader):
  """Refuses a key given twice in one section: PyYAML keeps the last, so a second `train:` section
  would silently undo the first."""

  def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
      key = self.construct_object(key_node, deep=deep)
      if not isinstance(key, collections.abc.Hashable):
        continue  # PyYAML's own check names it
      if key in seen:
        raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
      seen.add(key)
    return super().construct_mapping(node, deep)


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
  """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML)."""
  cfg, keys = Config(), all_keys()
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ConfigError(f"config file '{path}' does not exist")
    try:
      with path.open(encoding="utf-8") as f:  # its name, not "<unicode string>", in PyYAML's messages
        settings = yaml.load(f, Loader=UniqueKeys) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"config file '{path}' is not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"config file '{path}' cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(settings, dict):
      raise ConfigError(f"config file '{path}' holds a {type(settings).__name__}, not sections of key: value settings")
    for k, v in flatten(settings).items():
      set_key(cfg, k, v, keys)
  apply_overrides(cfg, overrides)
  return cfg


def apply_overrides(cfg: Config, overrides: typing.Sequence[str], only: tuple[str, ...] = ()) -> None:
  """`key=value` settings (values parsed as YAML), then the checks; with `only`, just keys starting so."""
  keys = all_keys()
  for item in overrides:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if only and not key.startswith(only):
      raise ConfigError(f"override '{item}' is not a setting this command takes ({', '.join(k for k in keys if k.startswith(only))})")
    if not sep:
      raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
      value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override '{item}': {raw!r} is not a YAML value ({getattr(e, 'problem', None) or 'unparsable'}); "
                        f"quote it as a string: {key}=\"'{raw}'\"") from None
    if keys.get(key) is str and value is not None and not isinstance(value, (str, list, dict)):
      value = raw.strip()  # as typed: YAML 1.1 reads 010 as 8, 1.10 as 1.1, yes as true
    set_key(cfg, key, value, keys)
  validate(cfg)


def from_dict(settings: dict[str, Any]) -> Config:
  """A config from its saved dictionary (as `to_dict` wrote it)."""
  cfg, keys = Config(), all_keys()
  for k, v in flatten(settings).items():
    set_key(cfg, k, v, keys)
  return cfg


def validate(cfg: Config) -> None:
  m, t = cfg.model, cfg.train
  checks = [
      (m.num_heads % m.num_kv_heads == 0, f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}"),
      (m.head_dim > 0 or m.d_model % m.num_heads == 0, f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim"),
      (head_dim(m) % 2 == 0, f"model.d_model={m.d_model} over model.num_heads={m.num_heads} gives head_dim {head_dim(m)}; rotary embeddings need it even (or set model.head_dim)"
       if not m.head_dim else f"model.head_dim={m.head_dim} must be even for rotary embeddings"),
      (t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}"),
      (t.batch_size % t.grad_accum == 0, f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"),
      (0.0 <= cfg.data.val_fraction < 1.0, f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)"),
      (cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be 0 (read in the training process) or more"),
      (not (cfg.data.mixture and cfg.data.val_source), "data.val_source does not apply to data.mixture: each source holds out its own data.val_fraction"),
      (sum(v == -1 for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) <= 1, "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
      *[(v == -1 or v >= 1, f"mesh.{k}={v} must be -1 (the remaining devices) or at least 1")
        for k, v in (("data", cfg.mesh.data), ("fsdp", cfg.mesh.fsdp), ("tensor", cfg.mesh.tensor))],
      (cfg.checkpoint.keep_every == 0 or cfg.checkpoint.every > 0 and cfg.checkpoint.keep_every % cfg.checkpoint.every == 0,
       f"checkpoint.keep_every={cfg.checkpoint.keep_every} must be a multiple of checkpoint.every={cfg.checkpoint.every} (only saved steps are kept)"),
      (cfg.profile.start_step >= 1 and cfg.profile.steps >= 0, f"profile.start_step={cfg.profile.start_step} must be at least 1 and profile.steps={cfg.profile.steps} at least 0"),
  ]
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)


def to_dict(cfg: Config) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def save(cfg: Config, path: str | Path) -> None:
  Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def head_dim(m: ModelConfig) -> int:
  return m.head_dim or m.d_model // m.num_heads
