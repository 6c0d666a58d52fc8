"""Hugging Face Llama checkpoints: logit parity with transformers after import, bit-exact round trips,
greedy generation that matches token for token, fine-tuning a converted model, and clear refusals."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from launch.convert import main as convert_main
from lm import config, convert, data, loop, sharding
from lm.checkpoint import Checkpoints
from lm.config import ConfigError, TokenizerConfig
from lm.convert import from_hf, to_hf, write_run
from lm.params import abstract_model
from lm.sampler import Sampler
from lm.tokenizer import Tokenizer, train
from lm.train import Steps
from tests.conftest import run_trainer, stacked, tiny_overrides

FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
# tests.conftest's tiny trainer model, so a converted one fine-tunes with the trainer's tiny settings.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)


def save_hf(path, tokenizer, family="llama", dtype=torch.float32, max_shard_size="5GB", unset=(), changes=None, **settings):
  """A random transformers model with the tokenizer's vocabulary, saved as safetensors; `unset`: keys
  left out of its config.json (transformers reads its defaults); `changes`: keys set there as
  transformers itself does not write them."""
  config_cls, model_cls = FAMILIES[family]
  torch.manual_seed(0)
  model = model_cls(config_cls(**{"vocab_size": tokenizer.vocab_size, **SHAPE, **settings}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)  # not all ones, so a `1 + scale` convention on either side would show
  model.to(dtype).save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
  shutil.copyfile(tokenizer.path, path / "tokenizer.model")
  written = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**{k: v for k, v in written.items() if k not in unset}, **(changes or {})}))
  return path


def forward(sampler: Sampler, ids: np.ndarray) -> np.ndarray:
  return np.asarray(nnx.merge(sampler.graphdef, sampler.params)(jnp.asarray(ids)))


def until_eos(ids, eos):
  return ids[:ids.index(eos)] if eos in ids else ids


PARITY = {
    "multi-head, tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "grouped-query, untied, eps and theta, shards": dict(tie_word_embeddings=False, rms_norm_eps=1e-5,
                                                         rope_theta=500000.0, max_shard_size="100KB"),
    "one kv head, head_dim 24, bfloat16 weights": dict(num_key_value_heads=1, head_dim=24, dtype=torch.bfloat16),
    "mistral without sliding window": dict(family="mistral", num_attention_heads=8, sliding_window=None,
                                           rope_theta=1e6),
    "mistral, kv heads unset (8)": dict(family="mistral", num_attention_heads=16, num_key_value_heads=8,
                                        sliding_window=None, unset=("num_key_value_heads",)),
    # transformers reads the theta in rope_parameters (or in a rope_scaling object, read as those) first
    "theta in rope_parameters and at the top level": dict(rope_theta=1e6, changes=dict(rope_theta=5e5)),
    "theta in rope_scaling only": dict(unset=("rope_parameters",),
                                       changes=dict(rope_scaling={"rope_type": "default", "rope_theta": 1e6})),
}


@pytest.mark.parametrize("settings", PARITY.values(), ids=PARITY.keys())
def test_imported_logits_equal_transformers_logits(tokenizer, tmp_path, settings):
  hf_dir = save_hf(tmp_path / "hf", tokenizer, initializer_range=0.2, **settings)
  from_hf(hf_dir, tmp_path / "run")
  ids = np.random.default_rng(0).integers(0, tokenizer.vocab_size, (2, 40))
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  with torch.no_grad():
    want = reference(torch.tensor(ids)).logits.numpy()
  assert np.abs(want).max() > 1.0  # logits large enough that the tolerance means something
  np.testing.assert_allclose(forward(Sampler.from_workdir(tmp_path / "run"), ids), want, atol=1e-4, rtol=0)


def test_export_import_round_trip_is_bit_exact_and_greedy_generation_matches(tokenizer, tmp_path):
  cfg = config.load(None, tiny_overrides(**{"model.vocab_size": tokenizer.vocab_size, "model.tie_embeddings": False}))
  rng = np.random.default_rng(0)  # large weights, so greedy choices are far from ties
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                        nnx.to_pure_dict(abstract_model(cfg.model)[1]))
  write_run(tmp_path / "run", cfg, params, tokenizer.path)
  to_hf(tmp_path / "run", tmp_path / "sharded", shard_bytes=100_000)
  assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
  assert convert_main(["--from-hf", str(tmp_path / "sharded"), "--workdir", str(tmp_path / "back")]) == 0

  back = Sampler.from_workdir(tmp_path / "back")
  assert back.cfg.model == cfg.model
  for (path, want), got in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(stacked(back.params))):
    assert np.array_equal(want, np.asarray(got)), jax.tree_util.keystr(path)

  assert convert_main(["--to-hf", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
  ours = Sampler.from_workdir(tmp_path / "run")
  theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
  their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  prompts = ["def main(argv):\n    ", "import os", "class Tree:\n    def __init__(self"]
  for prompt, completion in zip(prompts, ours.generate(prompts, max_new_tokens=12, temperature=0)):
    ids = ours.encode(prompt)  # with the BOS id in front
    assert their_tokenizer(prompt)["input_ids"] == ids  # as transformers' tokenizer encodes it
    assert their_tokenizer.decode(ids, skip_special_tokens=True) == prompt
    out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=12)
    assert completion.token_ids == until_eos(out[0, len(ids):].tolist(), tokenizer.eos_id)


def test_converted_checkpoint_restores_like_a_fresh_run(tokenizer, tmp_path):
  """All four items are there: a trainer resuming in the converted directory gets a fresh optimizer."""
  cfg = from_hf(save_hf(tmp_path / "hf", tokenizer), tmp_path / "run")
  cfg.mesh.data = 1
  steps = Steps(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  t = cfg.train
  data_iter = iter(data.batches(data.split(cfg.data)[0], Tokenizer(tmp_path / "run" / "tokenizer.model"),
                                seq_len=t.seq_len, global_batch=t.batch_size, seed=t.seed,
                                shuffle_window=data.shuffle_window(cfg.data, t.batch_size, t.seq_len)))
  ckpts = Checkpoints(tmp_path / "run" / "checkpoints", read_only=True)
  state = ckpts.restore(0, steps.abstract_state(), data_iter)
  ckpts.close()
  data_iter.close()
  fresh = steps.state_from_params(state.params)
  assert int(state.step) == 0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.opt_state, fresh.opt_state))


@pytest.mark.slow
def test_converted_model_with_a_padded_vocabulary_fine_tunes_with_init_from(tokenizer, tmp_path):
  padded = tokenizer.vocab_size + 8  # rows no token uses, as converted models often have
  hf_dir = save_hf(tmp_path / "hf", tokenizer, tie_word_embeddings=True, vocab_size=padded)
  assert convert_main(["--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run")]) == 0
  docs = data.TextFiles(data.stdlib_files())
  other = train((docs[i] for i in range(1, len(docs), 29)), TokenizerConfig(vocab_size=tokenizer.vocab_size, train_sentences=5000),
                tmp_path / "other.model")
  cfg = config.load("configs/tiny.yaml", tiny_overrides(**{"model.vocab_size": padded, "tokenizer.path": other.path}))
  with pytest.raises(ConfigError, match=f"^--init-from {tmp_path / 'run'}: tokenizer {other.path} is not the one that run was trained with"):
    loop.run(cfg, tmp_path / "other-run", init_from=str(tmp_path / "run"))  # same size, other pieces
  out = run_trainer(tmp_path / "ft", "train.steps=20", "log.every=5", "eval.every=20", f"model.vocab_size={padded}",
                    init_from=str(tmp_path / "run"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"initialized parameters from {tmp_path / 'run'} (step 0)" in out.stdout + out.stderr
  rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in rows if "loss" in row]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses


def test_a_llama_2_style_directory_imports_and_names_its_other_end_of_sequence_ids(tokenizer, tmp_path, capsys):
  """Its tokenizer_config.json lists the special pieces as added tokens, which change nothing; transformers'
  generate stops at every id eos_token_id lists, lm-sample at the tokenizer's and each --stop-token."""
  hf_dir = save_hf(tmp_path / "hf", tokenizer, eos_token_id=[tokenizer.eos_id, 7, 9])
  special = {str(i): {"content": tokenizer.sp.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i in (0, tokenizer.bos_id, tokenizer.eos_id)}
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({
      "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": special, "bos_token": "<s>",
      "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False, "model_max_length": 10**30,
      "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
      "unk_token": "<unk>", "use_default_system_prompt": False}))
  assert transformers.GenerationConfig.from_pretrained(hf_dir).eos_token_id == [tokenizer.eos_id, 7, 9]
  capsys.readouterr()
  assert convert_main(["--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run")]) == 0
  assert capsys.readouterr().out.splitlines()[0] == (
      "note: config.json's eos_token_id also lists 7, 9: pass --stop-token 7 --stop-token 9 to lm-sample to stop there "
      "as transformers does")


def hf_config(**changes):
  return {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, **changes}


UNSUPPORTED = [
    (dict(model_type="qwen2"), 'model_type="qwen2" is not supported; supported: llama, mistral'),
    (dict(attention_bias=True), "attention_bias=true is not supported"),
    (dict(mlp_bias=True), "mlp_bias=true is not supported"),
    (dict(hidden_act="gelu"), 'hidden_act="gelu" is not supported; valid: "silu"'),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096 is not supported; valid: null"),
    (dict(model_type="mistral"), "sliding_window=4096 (unset) is not supported; valid: null"),  # transformers' default
    (dict(rope_scaling={"type": "linear", "factor": 2.0}),
     'rope_scaling={"type": "linear", "factor": 2.0} is not supported; valid: null or an object with rope_type "default"'),
    (dict(rope_scaling="linear"), 'rope_scaling="linear" is not supported; valid: null or an object with rope_type "default"'),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
     'rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0} is not supported'),
    (dict(tie_word_embeddings="false"), 'tie_word_embeddings="false" is not supported; valid: true or false'),
    (dict(hidden_size=None), "'hidden_size' is missing"),
    (dict(hidden_size="64"), "config key 'model.d_model' expects int, got '64'"),
]


@pytest.mark.parametrize("changes,message", UNSUPPORTED, ids=[m.split(" is")[0] for _, m in UNSUPPORTED])
def test_unsupported_settings_fail_with_one_line_naming_the_field(tmp_path, changes, message):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(**changes)))
  with pytest.raises(ConfigError, match=re.escape(message)) as e:
    from_hf(tmp_path / "hf", tmp_path / "run")
  assert "\n" not in str(e.value) and str(e.value).count(str(tmp_path / "hf" / "config.json")) == 1
  assert not (tmp_path / "run").exists()


def test_weights_that_do_not_fit_the_model_are_refused(tokenizer, tmp_path):
  hf_dir = save_hf(tmp_path / "hf", tokenizer)
  weights = hf_dir / "model.safetensors"
  tensors = load_file(weights)

  def convert_with(**replace):
    save_file({k: v for k, v in {**tensors, **replace}.items() if v is not None}, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
      from_hf(hf_dir, tmp_path / "run")
    return str(e.value)

  bias = "model.layers.0.self_attn.q_proj.bias"
  assert f"tensor '{bias}' has no place in our Llama model" in convert_with(**{bias: np.zeros(64, np.float32)})
  assert "tensor 'model.layers.1.mlp.up_proj.weight' is missing (1 of 21 missing)" in convert_with(
      **{"model.layers.1.mlp.up_proj.weight": None})
  assert "tensor 'model.norm.weight' has shape [65]; config.json implies [64]" in convert_with(
      **{"model.norm.weight": np.ones(65, np.float32)})
  # config.json ties the head to the embedding, yet the weights hold a head of their own: transformers uses it
  (hf_dir / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()), "tie_word_embeddings": True}))
  assert ("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', yet config.json says tie_word_embeddings=true "
          "(transformers then unties them); set it to false to import the head") in convert_with()  # the weights as saved
  theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  assert not torch.equal(theirs.lm_head.weight, theirs.model.embed_tokens.weight)
  # Rotary frequencies saved by older transformers are derived from rope_theta, and a tied head that
  # equals the embedding adds nothing, so both are skipped.
  save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"],
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}, weights, metadata={"format": "pt"})
  from_hf(hf_dir, tmp_path / "run")


def test_cli_errors_are_one_line(tokenizer, tmp_path, capsys, monkeypatch):
  def fails(*argv):
    assert convert_main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err

  hf_dir = save_hf(tmp_path / "hf", tokenizer)
  chat = {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {"512": chat}}))
  assert transformers.AutoTokenizer.from_pretrained(hf_dir)("<|im_start|>")["input_ids"] == [512]  # one id, not its pieces
  capsys.readouterr()
  added = "(id 512) is not one of tokenizer.model's 512 pieces; we read tokenizer.model's pieces only"
  assert f"{hf_dir / 'tokenizer_config.json'}: added token \"<|im_start|>\" {added}" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  (hf_dir / "tokenizer_config.json").unlink()
  (hf_dir / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 513, "<|im_start|>": 512}))
  assert f"{hf_dir / 'added_tokens.json'}: added token \"<|im_start|>\" {added}" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  (hf_dir / "added_tokens.json").write_text("[]")
  assert f"'{hf_dir / 'added_tokens.json'}' is not a tokenizer file transformers reads" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  (hf_dir / "added_tokens.json").unlink()
  assert f"'{tmp_path / 'missing'}' is not a Hugging Face model directory" in fails(
      "--from-hf", str(tmp_path / "missing"), "--workdir", str(tmp_path / "run"))
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "file").write_text("x")
  assert f"work directory '{tmp_path / 'taken'}' already exists" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "taken"))
  assert "has no checkpoints/" in fails("--to-hf", "--workdir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
  assert f"output directory '{tmp_path / 'taken'}' already exists and is not an empty directory" in fails(
      "--to-hf", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "taken"))
  beneath = tmp_path / "taken" / "file" / "new"  # a directory that cannot be made (as unwritable as root gets)
  assert f"work directory '{beneath}' is not writable: Not a directory" in fails("--from-hf", str(hf_dir), "--workdir", str(beneath))
  (hf_dir / "config.json").write_text(json.dumps(hf_config(eos_token_id=[7, 9])))  # an added chat token ends it
  assert f"{hf_dir / 'config.json'}: eos_token_id=[7, 9] is not tokenizer.model's ({tokenizer.eos_id}); we start and stop" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  odd = config.load(None, tiny_overrides(**{"model.vocab_size": 512, "model.num_heads": 5, "model.num_kv_heads": 5,
                                            "model.head_dim": 16}))
  write_run(tmp_path / "odd", odd, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(abstract_model(odd.model)[1])),
            tokenizer.path)
  assert "not model.d_model=64 over model.num_heads=5; this run cannot be exported" in fails(
      "--to-hf", "--workdir", str(tmp_path / "odd"), "--out", str(tmp_path / "odd-hf"))
  assert not (tmp_path / "odd-hf").exists()  # a refusal makes no directory

  def full_disk(*_):
    raise OSError(28, "No space left on device")

  fine = config.load(None, tiny_overrides(**{"model.vocab_size": 512}))
  write_run(tmp_path / "fine", fine, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(abstract_model(fine.model)[1])),
            tokenizer.path)
  assert f"output directory '{beneath}' is not writable: Not a directory" in fails(
      "--to-hf", "--workdir", str(tmp_path / "fine"), "--out", str(beneath))
  with monkeypatch.context() as m:
    m.setattr(convert, "write_tensors", full_disk)
    assert f"writing '{tmp_path / 'hf2'}' failed (No space left on device); it holds part of the conversion: remove it, then rerun" in fails(
        "--to-hf", "--workdir", str(tmp_path / "fine"), "--out", str(tmp_path / "hf2"))
  (hf_dir / "config.json").write_text(json.dumps(hf_config(vocab_size=500)))
  assert f"has 512 pieces, more than {hf_dir / 'config.json'}'s vocab_size=500" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  (hf_dir / "tokenizer.model").unlink()
  assert "has no tokenizer.model" in fails("--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  (hf_dir / "config.json").write_text('{"hidden_size": 64,')
  assert f"{hf_dir / 'config.json'} is not valid JSON (Expecting property name enclosed in double quotes at line 1)" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  (hf_dir / "config.json").write_text("[]")
  assert f"{hf_dir / 'config.json'}: expected a JSON object of settings, not list" in fails(
      "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run"))
  sharded = save_hf(tmp_path / "sharded", tokenizer, max_shard_size="100KB")  # a download cut short
  shards = sorted(sharded.glob("model-*.safetensors"))
  shards[1].write_bytes(shards[1].read_bytes()[:1000])
  capsys.readouterr()
  assert f"'{shards[1]}' is not a readable safetensors file (" in fails("--from-hf", str(sharded), "--workdir", str(tmp_path / "r1"))
  shards[0].unlink()
  assert f"'{sharded}' lacks {shards[0].name}, one of the {len(shards)} weight files its index names (1 missing); download it again" in fails(
      "--from-hf", str(sharded), "--workdir", str(tmp_path / "r2"))
  with pytest.raises(SystemExit):
    convert_main(["--to-hf", "--workdir", str(tmp_path / "run")])
  assert "--to-hf needs --out HF_DIR" in capsys.readouterr().err

  def interrupted(*_):
    raise KeyboardInterrupt  # Ctrl-C while it converts

  monkeypatch.setattr(convert, "from_hf", interrupted)
  assert convert_main(["--from-hf", str(hf_dir), "--workdir", str(tmp_path / "r3")]) == 130
  assert capsys.readouterr().err == f"interrupted: {tmp_path / 'r3'} may hold part of the conversion; remove it, then rerun\n"
