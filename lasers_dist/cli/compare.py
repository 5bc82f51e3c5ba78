"""`lasers-compare RUN_OR_EVAL_DIR ... --out DIR`: a paper-style table, a rate-distortion plot and BD-rate.

Each argument is an evaluation folder written by lasers-eval, or a folder with such folders below it (e.g. a run
directory holding RUN/eval/*). Writes DIR/comparison.md, DIR/comparison.json and DIR/rate_distortion.png.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lasers-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="eval folders, or folders holding them")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--group", choices=("model", "kind"), default="model",
                   help="one RD curve per model (default) or per model kind (e.g. all VQ-VAE runs)")
    args = p.parse_args(argv)
    from lasers_dist.eval.compare import compare

    try:
        result = compare(args.paths, args.out, args.group)
    except (FileNotFoundError, ValueError) as err:
        print(f"lasers-compare: error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"written to {args.out}/comparison.md, comparison.json, {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
