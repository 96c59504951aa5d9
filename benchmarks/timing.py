"""Timing and device naming shared by the benchmarks (numpy and onnxruntime only, so that
:mod:`benchmarks.gpu` runs on a bare CUDA machine)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable

import onnxruntime as ort


def best_rate(fn: Callable[[], object], n_cells: int, repeat: int, min_seconds: float) -> float:
    """Cells per second of ``fn`` (best of ``repeat`` timed rounds after a warm-up)."""
    fn()
    rates = []
    for _ in range(repeat):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        rates.append(calls * n_cells / elapsed)
    return max(rates)


def nvidia_smi(query: str) -> str | None:
    """``nvidia-smi --query-gpu=QUERY`` for the first GPU (no header, no units), or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def gpu_name() -> str | None:
    """The GPU's name from nvidia-smi, or None (no GPU provider, or no nvidia-smi)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    return nvidia_smi("name")


def device_name(provider: str) -> str:
    if provider == "CPUExecutionProvider":
        return f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return f"{provider.removesuffix('ExecutionProvider')} ({gpu_name() or 'unnamed GPU'})"
