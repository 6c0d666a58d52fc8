"""Every test sees 8 simulated CPU devices, so sharded code paths run everywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    pytest.fail(f"{SHARED_DATA} is missing: CI and development machines keep shared/data beside the project")
  return SHARED_DATA


def tiny_overrides(**extra) -> list[str]:
  """A model small enough to compile and run in seconds."""
  base = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
          "model.d_ff": 128, "model.max_seq_len": 64, "train.seq_len": 32, "train.batch_size": 8,
          "tokenizer.vocab_size": 512}
  base.update(extra)
  return [f"{k}={v}" for k, v in base.items()]
