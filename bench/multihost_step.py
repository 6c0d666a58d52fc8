"""Seconds per training step of a 2-process local cluster, this checkout against another revision:
python -m bench.multihost_step [--baseline REV] [--steps N] [--repeats R]

Both train the same tiny model through launch.local_cluster; the baseline is `git archive REV`
unpacked into a temporary directory. A step's time comes from the tokens/s of each logged interval
after the first (which holds the compile); the best of R runs of each, run alternately, and every run beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
            "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=8", "train.warmup_steps=5",
            "log.every=10", "eval.steps=0", "checkpoint.every=100000", "tokenizer.model_type=char",
            "tokenizer.train_sentences=2000", "mesh.data=-1"]


def step_seconds(tree: Path, workdir: Path, steps: int, tokenizer: Path | None) -> float:
  cmd = [sys.executable, "-m", "launch.local_cluster", "--processes", "2", "--devices-per-process", "1", "--", "train",
         "--workdir", str(workdir), "--sample-prompt=", *SETTINGS, f"train.steps={steps}"]
  cmd += [f"tokenizer.path={tokenizer}"] if tokenizer else []
  out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"error: the run in {tree} failed:\n{out.stderr[-2000:]}")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]
  return statistics.median(8 * 64 / rate for rate in rates)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--baseline", default="HEAD~1", help="the git revision to compare with")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    base = Path(tmp) / "baseline"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    runs: dict[str, list[float]] = {"baseline": [], "this checkout": []}
    tokenizer = None
    for r in range(args.repeats):
      for name, tree in (("baseline", base), ("this checkout", ROOT)):
        workdir = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
        runs[name].append(step_seconds(tree, workdir, args.steps, tokenizer))
        tokenizer = tokenizer or workdir / "tokenizer.model"
  print(f"2 processes x 1 CPU device, tiny model, batch 8 x 64 tokens, {args.steps} steps, best of {args.repeats}\n")
  # every run shown: on a shared machine the spread says how far the best can be trusted
  print("| code | seconds per step (best) | ratio to baseline | every run |")
  print("|---|---|---|---|")
  for name, seconds in runs.items():
    label = f"baseline ({args.baseline})" if name == "baseline" else name
    every = ", ".join(f"{s * 1e3:.1f}" for s in seconds)
    print(f"| {label} | {min(seconds) * 1e3:.2f} ms | {min(seconds) / min(runs['baseline']):.3f} | {every} ms |")


if __name__ == "__main__":
  main()
