"""`lasers-export RUN_OR_CHECKPOINT OUT.safetensors`: weights + config in one file, loadable without DeepSpeed."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lasers-export", description=__doc__)
    parser.add_argument("source", help="run directory (newest checkpoint), checkpoints/step-NNNNNNNN folder, or export")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--with-discriminator", action="store_true", help="also store the PatchGAN weights")
    args = parser.parse_args(argv)
    from lasers_dist.pretrained import export_pretrained

    try:
        out = export_pretrained(args.source, args.out, with_discriminator=args.with_discriminator)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError (damaged, not safetensors) is a ValueError
        print(f"lasers-export: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
