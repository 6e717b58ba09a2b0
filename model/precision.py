"""Which floating-point type a device computes fastest in: the choice behind `--dtype auto`, made by measurement.

CPUs differ more than their names say. Intel Sapphire Rapids and later (AMX) and AMD Zen 4 and later
(AVX512-BF16) multiply bfloat16 matrices in hardware, 2-6x faster than float32 on the hosts measured so far; a CPU
without those instructions emulates bfloat16 about 100x slower than float32. So on CPU the decision reads the
capability and then times one bfloat16 and one float32 matrix product of a training-sized shape (about 0.2 s),
and picks bfloat16 only when it is clearly faster. CUDA keeps its rule (bfloat16 where the GPU has it, float16
with loss scaling on older GPUs); MPS runs float32.

Used by the trainer (`--dtype auto`, autocast over float32 master weights) and by inference (chat, server, web
demo, eval), so a machine makes the same choice everywhere. The measurement runs once per process.
"""

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bfloat16 matrix instructions
MATMUL_SIZE = 1024  # the side of the timed square products: the order of a training step's (tokens x hidden) GEMMs
MIN_SPEEDUP = 1.3  # bfloat16 must beat float32 by this factor: below it, its rounding is not worth the time


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype picked for a device, and why (the line a run prints first)."""

    dtype: str  # "float32" | "bfloat16" | "float16"
    reason: str


def cpu_bf16_flags() -> list[str]:
    """The native bfloat16 instruction sets this CPU reports (Linux /proc/cpuinfo; [] elsewhere or when unknown)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return []


def matmul_gflops(dtype: torch.dtype, size: int = MATMUL_SIZE, repeats: int = 3) -> float:
    """GFLOP/s of a (size x size) @ (size x size) product in `dtype` on the CPU: the best of `repeats` after a
    warm-up call (which builds the kernel), 2 size^3 FLOPs each."""
    generator = torch.Generator().manual_seed(0)  # its own generator: the run's seeded RNG stream is untouched
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def choose_cpu_dtype(flags: list[str], fp32_gflops: float | None, bf16_gflops: float | None) -> DtypeChoice:
    """The CPU decision from the capability and the two timings (None: not measured because no capability).

    bfloat16 when the CPU has native bf16 matrix instructions and its bf16 product ran at least MIN_SPEEDUP times
    the float32 one; float32 otherwise. Kept apart from the timing so a test can feed it any figures.
    """
    if not flags:
        return DtypeChoice("float32", "CPU without native bfloat16 (no AVX512-BF16 or AMX): float32")
    figures = f"bfloat16 {bf16_gflops:.0f} vs float32 {fp32_gflops:.0f} GFLOP/s ({'+'.join(flags)})"
    if bf16_gflops >= MIN_SPEEDUP * fp32_gflops:
        return DtypeChoice("bfloat16", f"CPU matmul {figures}: bfloat16 autocast")
    return DtypeChoice("float32", f"CPU matmul {figures}: bfloat16 not {MIN_SPEEDUP}x faster, float32")


@functools.cache
def measure_cpu_dtype() -> DtypeChoice:
    """choose_cpu_dtype on this machine's capability and timings (once per process: about 0.2 s)."""
    flags = cpu_bf16_flags()
    if not flags:
        return choose_cpu_dtype(flags, None, None)
    return choose_cpu_dtype(flags, matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16))


def resolve_dtype(name: str, device: str) -> DtypeChoice:
    """The compute dtype for `--dtype name` on `device` ("cpu", "cuda", "cuda:1", "mps").

    Args:
        name: "auto", or an explicit "float32" | "bfloat16" | "float16", which is returned as it is.
    Returns:
        DtypeChoice(dtype, reason). auto: on CUDA bfloat16 where supported (Ampere and newer), else float16 (the
        trainer adds a GradScaler); on MPS float32; on CPU measure_cpu_dtype().
    """
    if name != "auto":
        return DtypeChoice(name, f"--dtype {name}")
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "CUDA with bfloat16: bfloat16 autocast")
        return DtypeChoice("float16", "CUDA without bfloat16: float16 autocast with loss scaling")
    if device.startswith("mps"):
        return DtypeChoice("float32", "MPS: float32")
    return measure_cpu_dtype()
