"""`lasers-bench omp|data|step|scaling`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: lasers-bench {omp,data,step,scaling} [options]   (lasers-bench omp --help for the options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    which, rest = argv[0], argv[1:]
    if which == "omp":
        from lasers_dist.kernels.bench_omp import main as run
    elif which == "data":
        from lasers_dist.data.bench import main as run
    elif which == "step":
        from lasers_dist.kernels.bench_step import main as run
    elif which == "scaling":
        from lasers_dist.cli.bench_scaling import main as run
    else:
        print(f"lasers-bench: unknown benchmark {which!r}\n{usage}", file=sys.stderr)
        return 2
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
