"""Side-by-side timing helpers: interleaved repeats, median, so noisy shared machines hurt less."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
           f"python {platform.python_version()}, torch {torch.__version__}"


def compare(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn; calls are interleaved round-robin so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
