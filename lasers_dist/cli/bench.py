"""`lasers-bench omp|data|step|eval|memory|scaling`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import importlib
import sys

# Each benchmark lives beside what it measures; this entry point only dispatches (imports stay lazy, so
# `lasers-bench data` does not pay for DeepSpeed or Triton).
BENCHMARKS = {
    "omp": "lasers_dist.kernels.bench_omp",  # Batch-OMP backends, vectors/s
    "data": "lasers_dist.cli.bench_data",  # decoded images/s per DataLoader worker, time to first batch
    "step": "lasers_dist.kernels.bench_step",  # share of OMP in a DL-GAN step vs a VQ-GAN step
    "eval": "lasers_dist.cli.bench_eval",  # images/s of a full evaluation, with and without FLIP
    "memory": "lasers_dist.cli.bench_memory",  # peak memory and step time of the deep model
    "scaling": "lasers_dist.cli.bench_scaling",  # images/s and all-reduce share over process layouts
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: lasers-bench {{{','.join(BENCHMARKS)}}} [options]   (lasers-bench NAME --help for the options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    which, rest = argv[0], argv[1:]
    if which not in BENCHMARKS:
        print(f"lasers-bench: unknown benchmark {which!r}\n{usage}", file=sys.stderr)
        return 2
    result = importlib.import_module(BENCHMARKS[which]).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
