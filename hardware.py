"""Where and how the math runs: the device, the autocast dtype, matmul and allocator settings and the device's peak
FLOP/s.

Each choice lives in one function here so every script makes it the same way.
"""
import contextlib
import ctypes
import ctypes.util
import re
import sys
import time
import warnings
from typing import Optional

import torch

from errors import UserError

# bfloat16 has float32's range and runs on every GPU since Ampere; float16 is for older GPUs (V100, T4), whose
# tensor cores have it and not bfloat16: its narrow range needs a gradient scaler (optimizer.build_scaler).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is the best device present: CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. 'auto' is bfloat16 where the hardware computes it natively: GPUs since Ampere, and CPUs
    with AMX or AVX512-BF16, whose bfloat16 matmuls run 2.2x (AVX512-BF16) to 6.4x (AMX) float32's (BENCHMARKS.md).
    float16 on older CUDA GPUs (V100, T4: its tensor cores run ~8x float32). float32 elsewhere: on other CPUs
    bfloat16 is emulated and slower."""
    if name == "auto":
        if device.type == "cuda":  # emulated bf16 (pre-Ampere) would be slower than float16's tensor cores
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    if DTYPES[name] == torch.float16 and not autocasts_to(device, torch.float16):
        raise UserError(f"--dtype float16: torch {torch.__version__} cannot autocast to float16 on {device.type}; "
                        f"use --dtype bfloat16 or float32")
    return DTYPES[name]


def autocasts_to(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on this device runs matmuls in dtype. Where it cannot (float16 on the CPU in older torch),
    torch warns and computes in float32, which would train silently slower than asked, or refuses outright."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type=device.type, dtype=dtype):
                ones = torch.ones(2, 2, device=device)
                return (ones @ ones).dtype == dtype
    except RuntimeError:
        return False


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 (Sapphire Rapids and newer Xeons, Zen 4): torch's private probes, absent in old torch."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes; the weights and optimizer stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense bfloat16 tensor-core peaks from the datasheets (no 2:4 sparsity, which doubles the printed figure; GeForce
# cards with float32 accumulation), keyed by the model as the device name spells it.
GPU_PEAK_BF16 = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12,
    "H800": 989e12, "H800 PCIe": 756e12, "H20": 148e12, "B200": 2250e12, "A100": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "MI300X": 1307e12,
}


def datasheet_peak(device_name: str) -> Optional[float]:
    """The GPU_PEAK_BF16 entry whose words appear together in the device name, the longest where several do
    ("NVIDIA H100 PCIe" is the PCIe card, "NVIDIA H100 80GB HBM3" the SXM one); whole words only, so an L40 is
    no L4. None for a GPU not in the table."""
    words = re.split(r"[\s\-_]+", device_name.upper())

    def named(key: str) -> bool:
        k = key.upper().split()
        return any(words[i:i + len(k)] == k for i in range(len(words)))
    matches = [key for key in GPU_PEAK_BF16 if named(key)]
    return GPU_PEAK_BF16[max(matches, key=lambda key: len(key.split()))] if matches else None


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """FLOP/s the device can reach in this dtype, for MFU: a GPU's datasheet (bfloat16 on a GPU in the table),
    a timed large matmul on a CPU or MPS (a practical peak, no datasheet applies). None, and no MFU, for any other
    GPU: a measured figure there would be a GPU's clock of the day, not its peak, and flatter the MFU."""
    if device.type == "cuda":
        return datasheet_peak(torch.cuda.get_device_name(device)) if dtype in (torch.bfloat16, torch.float16) else None
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of an n x n x n matmul in dtype: a practical peak where no datasheet applies (CPUs)."""
    # Constant operands: random ones would draw from the global RNG and break exact resume of training.
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    a @ b  # warm up: first calls pick kernels and allocate
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    reps = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))
    start = time.perf_counter()
    for _ in range(reps):  # queued back to back, one wait at the end: a sync per matmul would idle the GPU
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def configure(device: torch.device):
    """Settings that make training fast on this device: TF32 on CUDA, the allocator on Linux CPUs."""
    if device.type == "cpu":
        keep_freed_memory()
    if device.type != "cuda":
        return
    # TF32 for float32 matmuls and convolutions on Ampere and newer: ~8x the fp32 throughput for a negligible
    # precision cost. Through fp32_precision where torch has it (2.9+, where the allow_tf32 flags are deprecated).
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory():
    """glibc's malloc serves every allocation from its heap and keeps what is freed there for the next one. By
    default it maps each allocation over 32 MB afresh and unmaps it when freed, and a CPU training step allocates
    its logits, gradients and their temporaries (hundreds of MB) anew every step: the kernel then faults in and
    zeroes every page again, 100 ms per 256 MB on the 2-core dev machine (BENCHMARKS.md, cpubound). The cost:
    memory freed is not handed back to the OS, so the process keeps its peak, which a training run holds anyway.
    Elsewhere (macOS, musl, Windows) nothing changes."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_MAX, 0)  # no mmap for large blocks: the heap serves them, and reuses them once freed
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and keeps up to 2 GB free at its top rather than returning it


def peak_memory(device: torch.device) -> float:
    """Peak memory of this process so far, in bytes: CUDA's allocator peak on a GPU, the peak RSS elsewhere."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        import resource  # POSIX only
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
