"""Shared helpers: machine description, matmul peak, alternating rounds."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def cpu_info() -> dict[str, Any]:
    """CPU model, logical cores and the flags that decide bf16 speed (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in wanted},
    }


def matmul_peak(dtype: Any, n: int = 1024, reps: int = 10, rounds: int = 3) -> float:
    """Best-of-rounds dense n x n matmul FLOP/s at the current torch thread count.

    The MFU denominator: what this machine's BLAS actually reaches, not a datasheet number.
    """
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def alternate(
    sides: dict[str, Callable[[], float]], rounds: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run every side once per round, in rotating order, so background load hits all alike.

    Each side returns a rate (higher is better). Returns (median rate per side, all rates).
    """
    names = list(sides)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            rates[k].append(sides[k]())
    return {k: statistics.median(v) for k, v in rates.items()}, rates


def median_ratio(rates: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round ratio num/den (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(rates[num], rates[den], strict=True))


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)
