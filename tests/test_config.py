"""Config loading, overrides and their one-line errors."""

from pathlib import Path

import pytest
import yaml

from lm import config
from lm.config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_overrides_apply_on_top_of_the_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  d_model: 96\ntrain:\n  learning_rate: 1.0e-3\n")
  cfg = config.load(path, ["train.learning_rate=0.5", "model.dtype=bfloat16", "mesh.rules={embed: [tensor]}"])
  assert cfg.model.d_model == 96 and cfg.train.learning_rate == 0.5 and cfg.model.dtype == "bfloat16"
  assert cfg.mesh.rules["embed"] == ["tensor"] and cfg.mesh.rules["batch"] == ["data", "fsdp"]


def test_a_string_setting_takes_the_text_as_typed():
  """YAML 1.1 would read these as 8, 1.1 and true."""
  cfg = config.load(None, ["data.text_field=010", "tokenizer.path=runs/1.10", "data.source=yes", "tokenizer.path=1.10"])
  assert (cfg.data.text_field, cfg.tokenizer.path, cfg.data.source) == ("010", "1.10", "yes")
  assert config.load(None, ["data.text_field='body'", "tokenizer.path="]).data.text_field == "body"  # quoted: YAML's string


def test_int_is_accepted_where_a_float_is_expected():
  assert config.load(None, ["train.learning_rate=1"]).train.learning_rate == 1.0
  assert config.load(None, ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4


@pytest.mark.parametrize("override,message", [
    ("model.d_modle=3", r"unknown config key 'model.d_modle'; did you mean model.d_model"),
    ("trian.steps=3", r"unknown config key 'trian.steps'; did you mean train.steps"),
    ("model.d_model=big", r"config key 'model.d_model' expects int, got 'big'"),
    ("train.learning_rate=fast", r"config key 'train.learning_rate' expects float, got 'fast'"),
    ("model.tie_embeddings=3", r"config key 'model.tie_embeddings' expects bool, got 3"),
    ("model.remat=some", r"config key 'model.remat' is 'some'; valid: none, full, save_matmuls"),
    ("train.steps", r"override 'train.steps' is not of the form key=value"),
    ("model.num_kv_heads=3", r"model.num_kv_heads=3 must divide model.num_heads=4"),
    ("model.d_model=100", r"model.d_model=100 over model.num_heads=4 gives head_dim 25; rotary embeddings need it even \(or set model.head_dim\)"),
    ("model.head_dim=7", r"model.head_dim=7 must be even for rotary embeddings"),
    ("train.seq_len=4096", r"train.seq_len=4096 exceeds model.max_seq_len=256"),
    ("log.every=-1", r"config key 'log.every' is -1; it should be greater than or equal to 0"),
    ("train.grad_accum=0", r"config key 'train.grad_accum' is 0; it should be greater than 0"),
    ("model.num_kv_heads=0", r"config key 'model.num_kv_heads' is 0; it should be greater than 0"),
    ("train.steps=0", r"config key 'train.steps' is 0; it should be greater than 0"),
    ("train.b2=1", r"config key 'train.b2' is 1.0; it should be less than 1"),
    ("sample.chunk=0", r"config key 'sample.chunk' is 0; it should be greater than 0"),
    ("data.source=*.txt", r"override 'data.source=\*.txt': '\*.txt' is not a YAML value \(.*\); quote it as a string: data.source=\"'\*.txt'\""),
    ("train.seed=-1", r"config key 'train.seed' is -1; it should be greater than or equal to 0"),
    ("train.learning_rate=inf", r"config key 'train.learning_rate' is inf; it must be a finite number"),
    ("data.mixture={stdlib: 0}", r"config key 'data.mixture' weighs {'stdlib': 0}; weights must be positive numbers"),
    ("mesh.rules={batch: 5}", r"config key 'mesh.rules' expects dict\[str, list\[str\]\], got {'batch': 5}"),
    ("mesh.tensor=0", r"mesh.tensor=0 must be -1 \(the remaining devices\) or at least 1"),
    ("checkpoint.keep_every=750", r"checkpoint.keep_every=750 must be a multiple of checkpoint.every=500 \(only saved steps are kept\)"),
    ("mesh.rules={mpl: [tensor]}", r"mesh.rules has no logical axis 'mpl'; did you mean mlp\? \(valid: batch, vocab, "),
])
def test_errors_are_one_line_naming_key_and_valid_values(override, message):
  with pytest.raises(ConfigError, match=message) as err:
    config.load(None, [override])
  assert "\n" not in str(err.value)


def test_a_config_file_that_is_not_sections_of_settings_is_one_line(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("- train\n- model\n")
  with pytest.raises(ConfigError, match=f"^config file '{path}' holds a list, not sections of key: value settings$"):
    config.load(path)
  path.write_text("train: [steps\n")
  with pytest.raises(ConfigError, match=f"^config file '{path}' is not valid YAML \\(.*\\)$"):
    config.load(path)
  path.write_text("train:\n  steps: 9\nmodel:\n  d_model: 64\ntrain:\n  batch_size: 4\n")  # the second would undo steps
  with pytest.raises(ConfigError, match=f"^config file '{path}' is not valid YAML \\('train' is given twice in \"{path}\", line 5, column 1\\)$"):
    config.load(path)
  path.write_bytes(b"train:\n  steps: 9 # caf\xe9\n")
  with pytest.raises(ConfigError, match=f"^config file '{path}' cannot be read \\('utf-8' codec can't decode byte 0xe9 .*\\)$"):
    config.load(path)


def test_unknown_key_in_a_file_is_reported(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("train:\n  stpes: 3\n")
  with pytest.raises(ConfigError, match="unknown config key 'train.stpes'; did you mean train.steps"):
    config.load(path)


def test_missing_file():
  with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
    config.load("nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_presets_load_and_save_round_trip(path, tmp_path):
  cfg = config.load(path)
  config.save(cfg, tmp_path / "resolved.yaml")
  assert config.load(tmp_path / "resolved.yaml") == cfg
  assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["model"]["d_model"] == cfg.model.d_model


def test_presets_span_tiny_to_7b():
  from lm.model import count_params

  names = {p.stem for p in CONFIGS}
  assert {"tiny", "125m", "1b", "7b"} <= names
  sizes = {}
  for name in ("125m", "1b", "7b"):
    sizes[name] = count_params(config.load(CONFIGS[0].parent / f"{name}.yaml").model)
  assert 100e6 < sizes["125m"] < 170e6
  assert 0.9e9 < sizes["1b"] < 1.5e9
  assert 6.5e9 < sizes["7b"] < 7.0e9  # Llama-2-7B: 6.74B
