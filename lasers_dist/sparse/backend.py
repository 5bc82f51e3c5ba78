"""Which backend `batch_omp(backend="auto")` runs, and the self-check that gates the Triton kernel.

The fused Triton kernel (kernels/omp_triton.py) is tested on CPU under Triton's interpreter, which accepts
programs that a GPU compiler may reject, and a driver, card or Triton release the project never ran on may
miscompile it. So the first time `auto` would use the kernel for a check key (device, input dtype, K, dim, S)
it compiles and runs it on a small random problem and compares with the torch backend: the supports must be the
same on >= 99% of the rows and the coefficients of those rows equal within 1e-4 (relative to the row's largest).
The key is the kernel's compile key: Triton specialises on K and dim and the constexprs derived from them, not
on N (the kernel opts out) or on unaligned pointers (inputs are aligned), so every later call runs the binary
that was checked.

Any exception or disagreement gives one TritonFallbackWarning naming the error and the fallback, and `auto`
uses the torch backend for the rest of the process (every key, every device). An explicit backend="triton" is
never checked here and still raises whatever the kernel raises. The trainer resolves the backend at start-up
(lasers_dist.train.omp_backend), so a run's first step does not pay for the check and every rank agrees.

Test hook: `inject_self_check_fault` makes the following self-checks fail for real, inside the real check: the
kernel either launched with a block Triton rejects, or run on wrong input so that its codes really disagree.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# Signals in the self-check problem: enough rows for the 99% support criterion to mean something, small
# enough that the check costs one kernel compile plus milliseconds.
CHECK_SIGNALS = 1024
MIN_SAME_SUPPORT = 0.99
COEFF_RTOL = 1e-4
FAULTS = ("launch", "disagree")


class TritonFallbackWarning(RuntimeWarning):
    """backend="auto" stopped using the Triton kernel for this process (the message says why)."""


@dataclass(frozen=True)
class SelfCheck:
    """Outcome of one Triton self-check. detail: the agreement figures, or the error."""

    device: str
    dtype: str
    num_atoms: int
    dim: int
    sparsity: int
    passed: bool
    detail: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BackendChoice:
    """What batch_omp(backend=requested) runs for tensors on a device: backend "triton" or "torch", why (in
    words), and the self-check behind it when one ran."""

    requested: str
    backend: str
    reason: str
    check: SelfCheck | None = None


_checks: dict[tuple, SelfCheck] = {}
_fallback_reason: str | None = None  # set once auto stops using Triton for this process
_fault: str | None = None


def inject_self_check_fault(fault: str | None) -> None:
    """Test hook: make every following self-check fail for real (None: stop).

    "launch": the check launches the real kernel with a block of 24 signals, which Triton rejects (tl.arange
    needs a power of two) -- a genuine Triton error, of the kind a GPU compiler raises for a kernel the
    interpreter accepted. "disagree": the check runs the real kernel on the dictionary with its columns rolled
    by one, so its codes really disagree with the torch reference on the true dictionary, as a kernel that
    loads the dictionary wrongly would. Results already cached are kept (see clear_self_checks).
    """
    global _fault
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS} or None, got {fault!r}")
    _fault = fault


def clear_self_checks() -> None:
    """Forget every self-check result and the fallback (tests, or a process that changed its Triton setup)."""
    global _fallback_reason
    _checks.clear()
    _fallback_reason = None


def fallback_reason() -> str | None:
    """Why `auto` uses the torch backend for the rest of this process, or None while it may use Triton."""
    return _fallback_reason


def fall_back_to_torch(reason: str) -> None:
    """From now on `auto` uses the torch backend in this process; warns once (the first reason is kept)."""
    global _fallback_reason
    if _fallback_reason is None:
        _fallback_reason = reason
        warnings.warn(
            f"batch_omp: {reason}; backend='auto' uses the torch backend for the rest of this process",
            TritonFallbackWarning, stacklevel=3,
        )


def normalized_device(device: torch.device | str) -> torch.device:
    """cuda -> cuda:<current index>, so one device has one check key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def triton_self_check(device: torch.device | str, dtype: torch.dtype, num_atoms: int, dim: int,
                      sparsity: int) -> SelfCheck:
    """The (cached) self-check of the Triton kernel for x of `dtype` over (num_atoms, dim) atoms at `sparsity`
    on `device` (CUDA, or CPU when the kernels run under TRITON_INTERPRET=1). Never raises for a kernel failure:
    that is a failed SelfCheck."""
    device = normalized_device(device)
    key = (str(device), dtype, num_atoms, dim, sparsity)
    if key not in _checks:
        _checks[key] = _run_check(device, dtype, num_atoms, dim, sparsity)
    return _checks[key]


def auto_uses_triton(x: Tensor, num_atoms: int, sparsity: int) -> bool:
    """For batch_omp(backend="auto") on CUDA x within the kernel's bounds: whether to run the kernel (after its
    self-check on first use of the key); a failed check switches this process to torch, with one warning."""
    return _fallback_reason is None and _checked(x.device, x.dtype, num_atoms, x.shape[1], sparsity).passed


def _checked(device: torch.device | str, dtype: torch.dtype, num_atoms: int, dim: int, sparsity: int) -> SelfCheck:
    """triton_self_check, and the process-wide fallback when it failed."""
    check = triton_self_check(device, dtype, num_atoms, dim, sparsity)
    if not check.passed:
        fall_back_to_torch(f"the Triton kernel failed its self-check on {check.device} ({check.dtype} signals, "
                           f"K={num_atoms}, dim={dim}, S={sparsity}): {check.detail}")
    return check


def resolve_backend(requested: str, device: torch.device | str, dtype: torch.dtype, num_atoms: int, dim: int,
                    sparsity: int) -> BackendChoice:
    """Which backend batch_omp(backend=requested) will run for x of `dtype` on `device` over (num_atoms, dim)
    atoms at `sparsity`, deciding it now: for "auto" on CUDA this is the kernel's first use (self-check, and the
    fallback if it fails). For "triton" the self-check runs too, so a caller can refuse to start on a kernel
    that fails; batch_omp itself never checks an explicit "triton"."""
    from lasers_dist.sparse.omp import BACKENDS

    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    device = normalized_device(device)
    if requested == "torch":
        return BackendChoice(requested, "torch", "requested")
    if requested == "auto":
        reason = _auto_excludes_triton(device, dtype, num_atoms, dim, sparsity)
        if reason is not None:
            return BackendChoice(requested, "torch", reason)
    check = _checked(device, dtype, num_atoms, dim, sparsity)
    if requested == "auto" and not check.passed:
        return BackendChoice(requested, "torch", f"the Triton kernel failed its self-check: {check.detail}", check)
    verdict = "passed" if check.passed else "FAILED"
    return BackendChoice(requested, "triton", f"self-check {verdict} on {check.device}: {check.detail}", check)


def _auto_excludes_triton(device: torch.device, dtype: torch.dtype, num_atoms: int, dim: int,
                          sparsity: int) -> str | None:
    """Why "auto" runs torch without trying the kernel, or None when it would try it."""
    if device.type != "cuda":
        return f"{device.type} device: the Triton kernel runs on CUDA only"
    if dtype == torch.float64:
        return "float64 signals stay float64 on the torch backend"
    if _fallback_reason is not None:
        return _fallback_reason
    try:
        from lasers_dist.kernels.omp_triton import triton_supported
    except ImportError as error:
        return f"the Triton kernel cannot be imported ({error})"
    if not triton_supported(CHECK_SIGNALS, num_atoms, dim, sparsity):
        return f"K={num_atoms}, dim={dim}, S={sparsity} are outside the Triton kernel's bounds"
    return None


def _run_check(device: torch.device, dtype: torch.dtype, num_atoms: int, dim: int, sparsity: int) -> SelfCheck:
    start = time.perf_counter()
    try:
        passed, detail = _compare_with_torch(device, dtype, num_atoms, dim, sparsity)
    except Exception as error:  # noqa: BLE001 - any failure of the kernel means: do not use it
        passed, detail = False, _describe(error)
    return SelfCheck(str(device), str(dtype).removeprefix("torch."), num_atoms, dim, sparsity, passed, detail,
                     time.perf_counter() - start)


def _compare_with_torch(device: torch.device, dtype: torch.dtype, num_atoms: int, dim: int,
                        sparsity: int) -> tuple[bool, str]:
    """Run the kernel and the torch backend on one random problem (own generator: the global RNG is untouched,
    so seeded training is not shifted by the check). Returns (passed, figures)."""
    from lasers_dist.kernels import omp_triton
    from lasers_dist.sparse.omp import batch_omp

    omp_triton.check_device(device)
    generator = torch.Generator().manual_seed(1234)
    atoms = torch.randn(num_atoms, dim, generator=generator)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    x = (3 * torch.randn(CHECK_SIGNALS, dim, generator=generator)).to(dtype)
    kernel_atoms, constants = atoms, omp_triton.kernel_constants(CHECK_SIGNALS, num_atoms, dim, sparsity)
    if _fault == "launch":
        constants = {**constants, "BLOCK_N": 24}
    elif _fault == "disagree":
        kernel_atoms = atoms.roll(1, dims=1)
    # batch_omp hands the kernel fp32 signals whatever their dtype; the reference gets the same, so coefficients
    # are compared before the rounding to the caller's dtype. The reference runs on the CPU: plain IEEE fp32
    # whatever the process set for CUDA matmuls (TF32 would move it by ~1e-3), and independent of the device.
    x = x.float()
    indices, coeffs = omp_triton.launch_kernel(x.to(device), kernel_atoms.to(device), sparsity, constants)
    reference = batch_omp(x, atoms, sparsity, backend="torch")
    return agreement(x, atoms, indices.cpu(), coeffs.cpu(), reference.indices, reference.coeffs)


def agreement(x: Tensor, atoms: Tensor, indices: Tensor, coeffs: Tensor, ref_indices: Tensor,
              ref_coeffs: Tensor) -> tuple[bool, str]:
    """Whether codes (indices, coeffs) agree with the torch backend's (ref_*) for signals x (N, dim) over atoms
    (K, dim), all on the CPU; returns (passed, figures in words).

    Supports are compared as sets. A row may differ only where the reference's greedy path has a float64
    near-tie (`near_tie_rows`): there two correct fp32 implementations may pick different atoms, and at S = dim
    with many atoms nearly every row has one (K = 4096, dim = S = 16: 50% of random rows differ, all of them
    near-ties). At most 1% of the rows may differ without one; the coefficients of rows with the same support
    must agree within COEFF_RTOL of the row's largest reference coefficient.
    """
    if not bool(((indices >= 0) & (indices < atoms.shape[0])).all()) or not bool(torch.isfinite(coeffs).all()):
        return False, "the kernel wrote atom ids outside [0, K) or non-finite coefficients"
    ids, order = indices.sort(dim=1)
    ref_ids, ref_order = ref_indices.sort(dim=1)
    same = (ids == ref_ids).all(dim=1)
    unexplained = ~same
    if bool(unexplained.any()):
        unexplained &= ~near_tie_rows(x, atoms, ref_indices)
    rel = 0.0
    if bool(same.any()):
        ours, theirs = coeffs.gather(1, order)[same], ref_coeffs.gather(1, ref_order)[same]
        scale = theirs.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        rel = float(((ours - theirs).abs() / scale).max())
    unexplained_fraction = float(unexplained.float().mean())
    detail = (f"same supports on {100 * float(same.float().mean()):.1f}% of {indices.shape[0]} rows, "
              f"{100 * unexplained_fraction:.1f}% differ without a float64 near-tie (need <= "
              f"{100 * (1 - MIN_SAME_SUPPORT):.0f}%), largest coefficient difference {rel:.2g} relative (need <= "
              f"{COEFF_RTOL:g})")
    passed = bool(same.any()) and unexplained_fraction <= 1 - MIN_SAME_SUPPORT and rel <= COEFF_RTOL
    return passed, detail


def near_tie_rows(x: Tensor, atoms: Tensor, indices: Tensor, rel_gap: float = 1e-5) -> Tensor:
    """(N,) bool: rows where some greedy step along `indices` (N, S) had a runner-up within rel_gap * |x| of the
    winner, replayed in float64 on the CPU. Only there may two correct fp32 implementations pick different atoms."""
    x64, atoms64, indices = x.double().cpu(), atoms.double().cpu(), indices.cpu()
    near = torch.zeros(x64.shape[0], dtype=torch.bool)
    for step in range(indices.shape[1]):
        support = indices[:, :step]
        residual = x64
        if step > 0:
            chosen = atoms64[support]  # (N, step, dim)
            gamma = torch.linalg.lstsq(chosen.transpose(1, 2), x64[:, :, None]).solution  # (N, step, 1)
            residual = x64 - (chosen * gamma).sum(dim=1)
        score = (residual @ atoms64.T).abs().scatter(1, support, -1.0)
        top2 = score.topk(min(2, score.shape[1]), dim=1).values
        if top2.shape[1] == 2:
            near |= top2[:, 0] - top2[:, 1] <= rel_gap * x64.norm(dim=1)
    return near


def _describe(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    # Triton's compile errors end with the reason after a dump of the source; keep the reason.
    text = lines[-1] if lines else ""
    return f"{type(error).__name__}: {text[:400]}"
