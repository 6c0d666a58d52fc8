"""Train a model: python -m launch.train --config configs/tiny.yaml --workdir DIR [key=value ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lm import config
from lm.config import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"  # found from any directory


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="lm-train", description=__doc__, allow_abbrev=False)
  parser.add_argument("--config", default=str(TINY), help="YAML preset (default: this checkout's configs/tiny.yaml)")
  parser.add_argument("--workdir", required=True, help="where the run writes everything")
  parser.add_argument("--init-from", metavar="OTHER_WORKDIR[:STEP]",
                      help="start from another run's parameters (fresh optimizer, step 0)")
  parser.add_argument("--sample-prompt", default="def ", help="printed with a sample after training ('' for none)")
  parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. train.steps=100")
  args = parser.parse_intermixed_args(argv)
  import jax
  from absl import logging

  from lm import distributed, loop, sampler  # after argument parsing, so --help needs no jax
  from lm.formats import utf8  # what the shell passes of bytes that are not UTF-8 (lone surrogates) as '?'

  logging.set_verbosity(logging.ERROR)  # orbax's routine warnings are not the user's business

  try:
    distributed.initialize()
    cfg = config.load(args.config, args.overrides)
    state = loop.run(cfg, args.workdir, init_from=args.init_from)
  except (ConfigError, loop.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # Ctrl-C during the steps saves and returns; this is before or after them
    print("interrupted; the same command goes on from the newest checkpoint (or the start)", file=sys.stderr)
    return 130
  if args.sample_prompt and int(state.step) == cfg.train.steps:
    try:
      completion = sampler.generate(args.workdir, [utf8(args.sample_prompt)], max_new_tokens=min(200, cfg.model.max_seq_len // 2),
                                    temperature=0.7, top_p=0.95)[0]
    except ConfigError as e:  # the run is trained and saved; only the sample is not to be had
      print(f"no sample: {e}", file=sys.stderr)
      return 0
    except KeyboardInterrupt:
      print(f"interrupted: no sample; the trained run is saved in {args.workdir}", file=sys.stderr)
      return 130
    if jax.process_index() == 0:
      print(f"\nsample ({completion.finish_reason}):\n{completion.prompt}{completion.text}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
