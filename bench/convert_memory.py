"""Host memory of Hugging Face conversion: python -m bench.convert_memory [--layers N --width D]

Writes a random Llama model in Hugging Face's layout (float32 safetensors shards), imports it with
`lm-convert --from-hf` and exports it back with `--to-hf`, each in a fresh process, and prints how far
each process's heap (anonymous memory) grew past what it held after its imports, as a multiple of the
float32 model. One copy of the model is the floor for both directions: the import fills our stacked arrays
before it writes them, the export restores them before it writes shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lm import config, data
from lm.convert import hf_config, write_tensors
from lm.params import abstract_model
from lm.tokenizer import Tokenizer, train as train_tokenizer

MEASURE = """
import sys
from lm import convert
from bench.convert_memory import field
print(field(open('/proc/self/status').read(), 'RssAnon'), flush=True)
getattr(convert, sys.argv[1])(sys.argv[2], sys.argv[3])
print(field(open('/proc/self/status').read(), 'VmHWM'))
"""


def field(status: str, name: str) -> int:
  return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(name + ":")) * 1024


def write_hf(out: Path, m: config.ModelConfig, tokenizer: Tokenizer) -> int:
  """A random model in Hugging Face's layout, in shards; returns its float32 size in bytes."""
  _, abstract = abstract_model(m)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: rng.standard_normal(v.shape, np.float32) * 0.02, nnx.to_pure_dict(abstract))
  write_tensors(out, params, m, shard_bytes=2**30)
  (out / "config.json").write_text(json.dumps(hf_config(m, tokenizer)))
  return sum(x.nbytes for x in jax.tree.leaves(params))


def peak(function: str, source: Path, target: Path) -> tuple[int, int, int]:
  """The process's anonymous (heap) memory after its imports and at its peak, polled every 2 ms, and
  the kernel's high-water mark of all its resident memory (which counts mapped file pages too)."""
  child = subprocess.Popen([sys.executable, "-c", MEASURE, function, str(source), str(target)],
                           stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
  base = int(child.stdout.readline())
  top = base
  while child.poll() is None:
    with suppress(OSError, StopIteration):
      top = max(top, field(Path(f"/proc/{child.pid}/status").read_text(), "RssAnon"))
    time.sleep(0.002)
  if child.returncode:
    raise SystemExit(f"{function} failed with status {child.returncode}")
  return base, top, int(child.stdout.read())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--width", type=int, default=2048)
  args = parser.parse_args()
  d = args.width
  m = config.ModelConfig(vocab_size=32000, d_model=d, num_layers=args.layers, num_heads=d // 128,
                         num_kv_heads=d // 128, d_ff=d * 8 // 3 // 256 * 256, max_seq_len=2048,
                         tie_embeddings=False)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / "hf").mkdir()
    docs = data.TextFiles(data.stdlib_files())
    tokenizer = train_tokenizer((docs[i] for i in range(0, len(docs), 9)),
                                config.TokenizerConfig(vocab_size=512, train_sentences=20000), tmp / "hf" / "tokenizer.model")
    model_bytes = write_hf(tmp / "hf", m, tokenizer)
    rows = [("import (--from-hf)", *peak("from_hf", tmp / "hf", tmp / "run")),
            ("export (--to-hf)", *peak("to_hf", tmp / "run", tmp / "hf_out"))]
  print(f"model: {model_bytes / 4 / 1e6:.0f}M parameters, {model_bytes / 1e9:.2f} GB in float32\n")
  print(f"{'direction':<20} {'heap after imports':>18} {'heap peak':>10} {'growth':>9} {'x model':>8} {'all resident':>13}")
  for name, base, top, hwm in rows:
    print(f"{name:<20} {base / 1e9:>15.2f} GB {top / 1e9:>7.2f} GB {(top - base) / 1e9:>6.2f} GB "
          f"{(top - base) / model_bytes:>8.2f} {hwm / 1e9:>10.2f} GB")


if __name__ == "__main__":
  main()
