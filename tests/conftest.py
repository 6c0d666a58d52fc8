"""Every test sees 8 simulated CPU devices, so sharded code paths run everywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    pytest.fail(f"{SHARED_DATA} is missing: CI and development machines keep shared/data beside the project")
  return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  """A 512-piece BPE tokenizer trained on a ninth of the built-in corpus."""
  from lm import data
  from lm.config import TokenizerConfig
  from lm.tokenizer import train

  docs = data.TextFiles(data.stdlib_files())
  return train((docs[i] for i in range(0, len(docs), 9)), TokenizerConfig(vocab_size=512, train_sentences=20000),
               tmp_path_factory.mktemp("tokenizer") / "t.model")


def tiny_overrides(**extra) -> list[str]:
  """A model small enough to compile and run in seconds."""
  base = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
          "model.d_ff": 128, "model.max_seq_len": 64, "train.seq_len": 32, "train.batch_size": 8,
          "tokenizer.vocab_size": 512}
  base.update(extra)
  return [f"{k}={v}" for k, v in base.items()]


def trainer_command(workdir: Path, *overrides: str, init_from: str | None = None) -> list[str]:
  """`python -m launch.train` on the built-in corpus with a model that trains in seconds."""
  settings = tiny_overrides(**{"train.seq_len": 64, "train.steps": 60, "train.warmup_steps": 5,
                               "eval.every": 30, "eval.steps": 2, "log.every": 10})
  # Settings on both sides of --workdir, as users type them.
  cmd = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.yaml", *settings, "--workdir", str(workdir),
         "--sample-prompt="]  # no sample unless a test asks for one
  return cmd + (["--init-from", init_from] if init_from else []) + list(overrides)


def run_trainer(workdir: Path, *overrides: str, devices: int = 8, init_from: str | None = None,
                **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run(trainer_command(workdir, *overrides, init_from=init_from), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, **kwargs)


def finish(procs, timeout: float) -> list[str]:
  """Each process's stderr once all have exited; at the timeout every one still running is killed (a
  job that hangs must not outlive its test)."""
  try:
    return [proc.communicate(timeout=timeout)[1] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


def stacked(params):
  """A sampler's listed parameters stacked along the layer axis again, as a checkpoint holds them."""
  import jax
  import jax.numpy as jnp

  blocks = params["blocks"]
  return params | {"blocks": jax.tree.map(lambda *layers: jnp.stack(layers), *(blocks[i] for i in sorted(blocks)))}
