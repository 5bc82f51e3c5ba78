"""Backend resolution for batch_omp: the Triton self-check, the fallback of backend="auto", the agreement across
ranks, provenance, and the kernel through Triton's real GPU compiler.

The self-check cases need kernels defined under TRITON_INTERPRET=1 (read when a kernel is defined, for the whole
process), so, like tests/test_omp_triton.py, this module re-runs itself in a child pytest with the interpreter
on; the parent only runs the cases that must not use it. The forced failures go through the documented hook
lasers_dist.sparse.backend.inject_self_check_fault: a real launch that Triton rejects, or the real kernel run on
wrong input, inside the real self-check. With CUDA the self-check cases also run natively (marker `cuda`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from interpreter_support import assert_passes_under_interpreter

pytest.importorskip("triton", reason="the Triton kernel needs the `triton` package")

from lasers_dist.config import ModelConfig  # noqa: E402
from lasers_dist.kernels import omp_triton  # noqa: E402
from lasers_dist.sparse import backend as B  # noqa: E402
from lasers_dist.sparse import batch_omp  # noqa: E402
from lasers_dist.train.omp_backend import BackendCheckError, agree, agree_omp_backend  # noqa: E402
from lasers_dist.train.provenance import build_provenance, write_provenance  # noqa: E402

INTERPRETED = omp_triton._interpreted()
REPO = Path(__file__).resolve().parents[1]
# Small shapes keep the interpreter fast; the check key is (device, dtype, K, dim, S).
SHAPE = (64, 8, 3)
CHECK_DEVICES = ["cpu"] if INTERPRETED else [
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA: the self-check cases run in the CPU-interpreter child")])
]


@pytest.fixture(autouse=True)
def fresh_backend_state():
    B.clear_self_checks()
    B.inject_self_check_fault(None)
    yield
    B.clear_self_checks()
    B.inject_self_check_fault(None)


def _unit(num_atoms: int, dim: int, seed: int = 0) -> torch.Tensor:
    atoms = torch.randn(num_atoms, dim, generator=torch.Generator().manual_seed(seed))
    return atoms / atoms.norm(dim=1, keepdim=True)


# ---- self-check and fallback (interpreter child on CPU; natively on CUDA) -------------------------------------


@pytest.mark.parametrize("device", CHECK_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_and_is_cached(device, dtype):
    check = B.triton_self_check(device, dtype, *SHAPE)
    assert check.passed, check.detail
    assert "same supports on" in check.detail and "of 1024 rows" in check.detail
    assert (check.num_atoms, check.dim, check.sparsity) == SHAPE and check.dtype == str(dtype)[6:]
    assert B.triton_self_check(device, dtype, *SHAPE) is check  # once per key and process
    choice = B.resolve_backend("triton", device, dtype, *SHAPE)
    assert (choice.backend, choice.check) == ("triton", check) and "self-check passed" in choice.reason


@pytest.mark.parametrize("device", CHECK_DEVICES)
@pytest.mark.parametrize("fault, expected", [
    ("launch", "arange's range must be a power of 2"),
    ("disagree", "differ without a float64 near-tie"),
])
def test_forced_failure_warns_once_and_auto_uses_torch_for_the_rest_of_the_process(device, fault, expected):
    B.inject_self_check_fault(fault)
    x = 3 * torch.randn(50, SHAPE[1], generator=torch.Generator().manual_seed(1)).to(device)
    with pytest.warns(B.TritonFallbackWarning) as caught:
        assert not B.auto_uses_triton(x, SHAPE[0], SHAPE[2])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert expected in message and "uses the torch backend for the rest of this process" in message
    assert B.fallback_reason() is not None and expected in B.fallback_reason()
    check = B.triton_self_check(device, torch.float32, *SHAPE)
    assert not check.passed and expected in check.detail
    # Every later key is torch without a new check or warning, even once the fault is gone.
    B.inject_self_check_fault(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not B.auto_uses_triton(x, 32, 2)
        choice = B.resolve_backend("auto", device, torch.float32, 32, SHAPE[1], 2)
    assert choice.backend == "torch"
    # The failing launch is a real Triton error: outside the check it raises.
    if fault == "launch":
        constants = {**omp_triton.kernel_constants(50, SHAPE[0], SHAPE[1], SHAPE[2]), "BLOCK_N": 24}
        with pytest.raises(Exception, match="power of 2"):
            omp_triton.launch_kernel(x.float(), _unit(SHAPE[0], SHAPE[1]).to(device), SHAPE[2], constants)
    # An explicit "triton" is not redirected by the fallback: it runs the kernel, and its errors still raise.
    dictionary = _unit(SHAPE[0], SHAPE[1]).to(device)
    codes = batch_omp(x, dictionary, SHAPE[2], backend="triton")
    kernel_indices, _ = omp_triton.batch_omp_triton(x, dictionary, SHAPE[2])
    assert torch.equal(codes.indices, kernel_indices)
    with pytest.raises(ValueError, match="backend='torch'"):
        batch_omp(x, _unit(64, 8).to(device), 17, backend="triton")


@pytest.mark.parametrize("device", CHECK_DEVICES)
def test_explicit_triton_with_a_failing_check_stops_the_run(device):
    B.inject_self_check_fault("launch")
    with pytest.warns(B.TritonFallbackWarning):  # the failed check also ends "auto"'s use of the kernel
        local = B.resolve_backend("triton", device, torch.float32, *SHAPE)
    assert local.backend == "triton" and "self-check FAILED" in local.reason
    with pytest.raises(BackendCheckError, match=r"model.omp_backend=triton.*rank\(s\) \[0\]"):
        agree(local, 0, 1, torch.device(device))


if INTERPRETED:

    def test_agreement_across_two_ranks_with_a_failure_on_one(tmp_path):
        """A real 2-rank torchrun (gloo): rank 1's self-check is made to fail, so both ranks use torch; an
        explicit "triton" stops both ranks with the same error; with no fault both agree on Triton."""
        driver = Path(__file__).with_name("omp_backend_driver.py")
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
             str(tmp_path)],
            env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
        for rank, seen in enumerate(ranks):
            assert seen["cpu"]["backend"] == "torch" and "CUDA only" in seen["cpu"]["reason"]
            assert seen["cpu"]["check"] is None
            assert seen["forced"]["backend"] == "torch" and seen["forced"]["failed_ranks"] == [1]
            assert seen["forced"]["local_check_passed"] == (rank == 0)
            # Rank 1 fell back on its own failed check, rank 0 (whose check passed) on the agreement.
            assert ("same supports" if rank == 1 else "failed on rank(s) [1]") in seen["forced"]["fallback_reason"]
            assert "rank(s) [1]" in seen["explicit_error"]
            assert seen["clean"]["backend"] == "triton" and "agreed by every rank" in seen["clean"]["reason"]


# ---- parent process only: CPU resolution, agreement without a process group, provenance, GPU compiler --------

if not INTERPRETED:

    def test_cpu_resolves_to_torch_without_a_check():
        choice = B.resolve_backend("auto", "cpu", torch.float32, 512, 16, 5)
        assert (choice.backend, choice.check) == ("torch", None) and "CUDA only" in choice.reason
        assert B.resolve_backend("torch", "cpu", torch.float32, 512, 16, 5).reason == "requested"
        assert B.resolve_backend("auto", "cpu", torch.float64, 512, 16, 5).backend == "torch"
        with pytest.raises(ValueError, match="backend must be one of"):
            B.resolve_backend("cuda", "cpu", torch.float32, 512, 16, 5)
        with pytest.raises(ValueError, match="fault must be one of"):
            B.inject_self_check_fault("segfault")
        run = agree_omp_backend(ModelConfig(), 0, 1, torch.device("cpu"))
        assert run.backend == "torch" and run.record()["omp_self_check"] is None
        assert "omp backend: torch (model.omp_backend=auto; cpu device" in run.message
        vq = agree_omp_backend(replace(ModelConfig(), bottleneck="vq"), 0, 1, torch.device("cpu"))
        assert vq.backend == "none"

    def test_explicit_triton_on_cpu_fails_its_check_at_start_up():
        # No hook needed: without the interpreter the kernel really cannot run on CPU tensors.
        with pytest.warns(B.TritonFallbackWarning), pytest.raises(BackendCheckError, match="Triton needs a CUDA"):
            agree_omp_backend(replace(ModelConfig(), omp_backend="triton"), 0, 1, torch.device("cpu"))
        assert "Triton needs a CUDA tensor" in B.fallback_reason()

    def test_self_check_cases_under_cpu_interpreter():
        assert_passes_under_interpreter(__file__)

    def test_provenance_keeps_earlier_starts(tmp_path):
        omp = agree_omp_backend(ModelConfig(), 0, 1, torch.device("cpu")).record()
        first = build_provenance(2, torch.device("cpu"), omp, extra={"note": "first"})
        write_provenance(tmp_path, first)
        write_provenance(tmp_path, build_provenance(2, torch.device("cpu"), omp))
        record = json.loads((tmp_path / "provenance.json").read_text())
        assert record["world_size"] == 2 and record["device"] == "cpu" and record["omp_backend"] == "torch"
        assert record["torch"] == torch.__version__ and record["triton"] and record["deepspeed"]
        assert [start["note"] for start in record["previous_starts"]] == ["first"]
        assert not list(tmp_path.glob(".provenance.json.tmp-*"))

    @pytest.mark.parametrize("arch, shape", [(90, (512, 16, 5)), (80, (512, 16, 5)), (90, (4096, 256, 16))],
                             ids=["sm90-paper", "sm80-paper", "sm90-largest"])
    def test_kernel_compiles_for_gpu_targets(arch, shape, tmp_path, monkeypatch):
        """Triton's real NVIDIA compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas), ahead of
        time and without a GPU, for the launch configuration batch_omp_triton uses on CUDA. The interpreter
        accepts programs this rejects (tl.dot below 16, layout or type errors in loops)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile as triton_compile

        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
        num_atoms, dim, sparsity = shape
        signature = {"x_ptr": "*fp32", "d_ptr": "*fp32", "indices_ptr": "*i64", "coeffs_ptr": "*fp32",
                     "N": "i32", "K": "i32", "DIM": "i32", "eps": "fp32"}
        constants = omp_triton.kernel_constants(1 << 20, num_atoms, dim, sparsity)
        signature.update({name: "constexpr" for name in constants})
        kernel = triton_compile(ASTSource(omp_triton._batch_omp_kernel, signature, constants),
                                target=GPUTarget("cuda", arch, 32), options={"num_warps": omp_triton.NUM_WARPS})
        assert len(kernel.asm["cubin"]) > 0 and f".target sm_{arch}" in kernel.asm["ptx"]
