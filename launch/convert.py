"""Convert Hugging Face Llama-family checkpoints to and from runs:
python -m launch.convert --from-hf HF_DIR --workdir OUT
python -m launch.convert --to-hf --workdir RUN [--step N] --out HF_DIR"""

from __future__ import annotations

import argparse
import sys

from lm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lm-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from-hf", metavar="HF_DIR",
                         help="import a directory with config.json, safetensors weights and tokenizer.model")
  direction.add_argument("--to-hf", action="store_true", help="export --workdir's checkpoint into --out")
  parser.add_argument("--workdir", required=True, help="the new run (import) or the run to export")
  parser.add_argument("--step", type=int, help="checkpoint step to export (default: the newest)")
  parser.add_argument("--out", metavar="HF_DIR", help="a new directory for the Hugging Face files (export)")
  args = parser.parse_intermixed_args(argv)
  if args.to_hf and not args.out:
    parser.error("--to-hf needs --out HF_DIR")
  if args.from_hf and (args.out or args.step is not None):
    parser.error("--out and --step go with --to-hf")
  from absl import logging

  from lm import convert  # after argument parsing, so --help needs no jax
  from lm.model import count_params

  logging.set_verbosity(logging.ERROR)  # orbax's routine warnings are not the user's business

  try:
    if args.to_hf:
      step = convert.to_hf(args.workdir, args.out, args.step)
      print(f"wrote {args.out} from {args.workdir} step {step}")
    else:
      cfg = convert.from_hf(args.from_hf, args.workdir)
      print(f"wrote {args.workdir} (step 0, {count_params(cfg.model) / 1e6:.1f}M parameters) from {args.from_hf}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"interrupted: {args.out if args.to_hf else args.workdir} may hold part of the conversion; remove it, then rerun",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
