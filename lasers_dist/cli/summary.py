"""`python -m lasers_dist.cli.summary RUN_DIR`: print what a training run achieved (and write RUN_DIR/summary.json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lasers_dist.cli.summary", description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from lasers_dist.train.summary import format_summary, summarize_run

    try:
        summary = summarize_run(args.run_dir)
    except FileNotFoundError as err:
        print(f"summary: {err}", file=sys.stderr)
        return 1
    (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
