"""Train a model: python -m launch.train --config configs/tiny.yaml --workdir DIR [key=value ...]"""

from __future__ import annotations

import argparse
import sys

from lm import config
from lm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lm-train", description=__doc__)
  parser.add_argument("--config", default="configs/tiny.yaml", help="YAML preset")
  parser.add_argument("--workdir", required=True, help="where the run writes everything")
  parser.add_argument("--init-from", metavar="OTHER_WORKDIR[:STEP]",
                      help="start from another run's parameters (fresh optimizer, step 0)")
  parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. train.steps=100")
  args = parser.parse_args(argv)
  from lm import loop  # after argument parsing, so --help needs no jax

  try:
    cfg = config.load(args.config, args.overrides)
    loop.run(cfg, args.workdir, init_from=args.init_from)
  except (ConfigError, loop.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
