"""Microbenchmark of Batch-OMP backends against scikit-learn (`lasers-bench omp`).

Each row times batch_omp on N random signals against a random unit-norm dictionary: best of --repeats calls
after one warm-up call. Derived figures (the same formulas for every backend, so they compare algorithms, not
what one implementation happens to do):

  flops = 2 N K dim                    correlations alpha0 = X D^T
        + sum_{s=1}^{S-1} 2 N K s      alpha updates alpha = alpha0 - G[:, tau] gamma (none after the last step)
        + sum_{s=1}^{S} 2 N s^2        the two triangular solves per step
  bytes = N dim b                      X read once
        + N S (8 + b)                  codes written (int64 indices + coefficients)
        + ceil(N / C) K^2 4            one fp32 Gram read per chunk, C = the torch backend's default chunk size
  with b the bytes per element of the input dtype. The torch backend evaluates each alpha update as a dense
  (N, dim) @ (dim, K) GEMM (2 N K dim flops instead of 2 N K s, traded for cache-friendly access), so its real
  arithmetic rate is higher than the GFLOP/s printed.

scikit-learn's orthogonal_mp_gram runs on the first --sklearn-subset signals in float64 (Gram precomputed,
Xy = D X^T timed with it), and each row reports its speed-up over it for the same (K, dim, S).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch

from lasers_dist.sparse import batch_omp
from lasers_dist.sparse.omp import _default_chunk_size

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
GRID = {"n": [2**14, 2**16, 2**20], "atoms": [256, 512, 1024], "sparsity": [3, 5, 8], "dim": [16, 64]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lasers-bench omp", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=65536, help="signals per call")
    parser.add_argument("--atoms", type=int, default=512, help="dictionary atoms K")
    parser.add_argument("--dim", type=int, default=16, help="signal dimension")
    parser.add_argument("--sparsity", type=int, default=5, help="atoms per signal S")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["torch", "triton", "all"], default="all",
                        help="all = every backend available on the device")
    parser.add_argument("--grid", action="store_true",
                        help="sweep N in {2^14, 2^16, 2^20}, K in {256, 512, 1024}, S in {3, 5, 8}, dim in {16, 64}")
    parser.add_argument("--sklearn-subset", type=int, default=2048,
                        help="signals timed with sklearn's orthogonal_mp_gram (0: skip sklearn)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="torch backend chunk size (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    parser.add_argument("--json", type=Path, default=Path("bench_results/omp.json"))
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    return args


def resolve_device(name: str) -> torch.device:
    """--device NAME as a torch device with an index ("cuda" -> "cuda:<current>"); ValueError naming what is
    missing when it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error})") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, built "
                         f"for CUDA {torch.version.cuda or 'none'}); use --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def derived_counts(n: int, atoms: int, dim: int, sparsity: int, elem_bytes: int) -> tuple[float, float]:
    """(flops, bytes) of one Batch-OMP call, by the formulas in the module docstring."""
    flops = 2 * n * atoms * dim
    flops += sum(2 * n * atoms * s for s in range(1, sparsity))
    flops += sum(2 * n * s * s for s in range(1, sparsity + 1))
    chunks = math.ceil(n / _default_chunk_size(atoms))
    moved = n * dim * elem_bytes + n * sparsity * (8 + elem_bytes) + chunks * atoms * atoms * 4
    return float(flops), float(moved)


def time_best(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def make_problem(n: int, atoms: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, dim, generator=gen)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    x = torch.randn(n, dim, generator=gen)
    return x.to(device=device, dtype=dtype), dictionary.to(device=device, dtype=torch.float32)


def time_sklearn(x: torch.Tensor, dictionary: torch.Tensor, sparsity: int, repeats: int) -> float:
    from sklearn.linear_model import orthogonal_mp_gram

    d = dictionary.double().cpu().numpy()
    signals = x.double().cpu().numpy()
    gram = d @ d.T
    return time_best(lambda: orthogonal_mp_gram(gram, d @ signals.T, n_nonzero_coefs=sparsity),
                     repeats, torch.device("cpu"))


def backends_for(requested: str, device: torch.device) -> tuple[list[str], list[dict]]:
    """Backends to time and the skipped ones with their reason."""
    wanted = ["torch", "triton"] if requested == "all" else [requested]
    run, skipped = [], []
    for backend in wanted:
        if backend == "triton":
            if requested == "all" and device.type != "cuda":
                skipped.append({"backend": "triton", "reason": f"Triton kernels need a CUDA device, got {device}"})
                continue
            try:
                from lasers_dist.kernels.omp_triton import batch_omp_triton  # noqa: F401
            except ImportError as error:
                skipped.append({"backend": "triton", "reason": f"cannot import the Triton kernel: {error}"})
                continue
        run.append(backend)
    return run, skipped


def result_row(backend: str, device: str, dtype: str, n: int, atoms: int, dim: int, sparsity: int,
               seconds: float, elem_bytes: int, sklearn_rate: float | None) -> dict:
    flops, moved = derived_counts(n, atoms, dim, sparsity, elem_bytes)
    rate = n / seconds
    return {"backend": backend, "device": device, "dtype": dtype, "N": n, "K": atoms, "dim": dim, "S": sparsity,
            "seconds": seconds, "vectors_per_s": rate, "gflops": flops / seconds / 1e9, "gbps": moved / seconds / 1e9,
            "speedup_vs_sklearn": rate / sklearn_rate if sklearn_rate else None}


def bench_config(args, n, atoms, dim, sparsity, backends, device, skipped) -> list[dict]:
    x, dictionary = make_problem(n, atoms, dim, DTYPES[args.dtype], device)
    rows = []
    sklearn_rate = None
    if args.sklearn_subset > 0:
        subset = min(args.sklearn_subset, n)
        seconds = time_sklearn(x[:subset], dictionary, sparsity, args.repeats)
        sklearn_rate = subset / seconds
        rows.append(result_row("sklearn", "cpu", "fp64", subset, atoms, dim, sparsity, seconds, 8, sklearn_rate))
    for backend in backends:
        kwargs = {"backend": backend, "chunk_size": args.chunk_size} if backend == "torch" else {"backend": backend}
        try:
            seconds = time_best(partial(batch_omp, x, dictionary, sparsity, **kwargs), args.repeats, device)
        except Exception as error:  # noqa: BLE001 - a backend that fails (Triton compile error, OOM) is reported
            skipped.append({"backend": backend, "N": n, "K": atoms, "dim": dim, "S": sparsity, "failed": True,
                            "reason": f"{type(error).__name__}: {str(error).strip()[-500:]}"})
            continue
        rows.append(result_row(backend, str(device), args.dtype, n, atoms, dim, sparsity, seconds,
                               x.element_size(), sklearn_rate))
    return rows


def machine_info(device: torch.device) -> dict:
    from lasers_dist.train.provenance import device_name

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "cpu": device_name(torch.device("cpu")),
            "device_name": device_name(device),
            # Timings on a shared machine are only as good as its load: record it.
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def print_table(rows: list[dict], skipped: list[dict]) -> None:
    columns = [("backend", "{}"), ("device", "{}"), ("dtype", "{}"), ("N", "{}"), ("K", "{}"), ("dim", "{}"),
               ("S", "{}"), ("seconds", "{:.4f}"), ("vectors_per_s", "{:,.0f}"), ("gflops", "{:.2f}"),
               ("gbps", "{:.3f}"), ("speedup_vs_sklearn", "{:.1f}x")]
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append(["-" if row[name] is None else fmt.format(row[name]) for name, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    for skip in skipped:
        where = f" at N={skip['N']}, K={skip['K']}, dim={skip['dim']}, S={skip['S']}" if "N" in skip else ""
        print(f"{'FAILED' if skip.get('failed') else 'skipped'} {skip['backend']}{where}: {skip['reason']}")


def self_checks(configs: list[tuple[int, int, int, int]], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """The Triton self-check (what backend="auto" runs before first using the kernel) per (K, dim, S) of the
    sweep, on CUDA: whether auto would use the kernel, with the agreement figures or the error."""
    if device.type != "cuda":
        return []
    from lasers_dist.sparse.backend import resolve_backend

    shapes = sorted({(atoms, dim, sparsity) for _, atoms, dim, sparsity in configs})
    choices = [resolve_backend("auto", device, dtype, *shape) for shape in shapes]
    return [{"K": k, "dim": d, "S": s, "auto_backend": choice.backend, "reason": choice.reason,
             "check": choice.check.as_dict() if choice.check else None}
            for (k, d, s), choice in zip(shapes, choices)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    backends, skipped = backends_for(args.backend, device)
    configs = ([(n, k, d, s) for n in GRID["n"] for k in GRID["atoms"] for d in GRID["dim"] for s in GRID["sparsity"]]
               if args.grid else [(args.n, args.atoms, args.dim, args.sparsity)])
    result = {"rows": [], "skipped": skipped, "step": None, "machine": machine_info(device),
              "self_checks": self_checks(configs, DTYPES[args.dtype], device) if "triton" in backends else [],
              "flops_formula": "2NK*dim + sum_{s<S} 2NKs + sum_{s<=S} 2Ns^2",
              "bytes_formula": "N*dim*b + N*S*(8+b) + ceil(N/chunk)*K^2*4"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for n, atoms, dim, sparsity in configs:
        result["rows"] += bench_config(args, n, atoms, dim, sparsity, backends, device, skipped)
        args.json.write_text(json.dumps(result, indent=2))  # after every config: a cut-off sweep keeps its rows
    print_table(result["rows"], skipped)
    if args.backend == "all":
        # The share of OMP in a whole DL-GAN training step at 256^2, against the same step with the VQ bottleneck.
        from lasers_dist.kernels.bench_step import main as bench_step

        result["step"] = bench_step(["--device", str(device), "--json", str(args.json.with_name("step.json"))])
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
