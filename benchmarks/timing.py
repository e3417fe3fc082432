"""Wall-clock medians for the benchmark scripts (imported from this folder, which Python puts on the path)."""

import statistics
import time

import torch

__all__ = ["median_ratio", "median_seconds"]


def median_seconds(fn, repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls, synchronising on CUDA."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_ratio(fn, baseline, repeats: int, warmup: int = 1) -> float:
    """Median over ``repeats`` of time(``fn``) / time(``baseline``), the two run back to back in alternating order.

    For two variants of one pass whose difference is smaller than the drift between repeats of the same pass.
    """
    for _ in range(warmup):
        fn()
        baseline()
    ratios = []
    for i in range(repeats):
        order = (fn, baseline) if i % 2 == 0 else (baseline, fn)
        times = {}
        for f in order:
            start = time.perf_counter()
            f()
            times[f] = time.perf_counter() - start
        ratios.append(times[fn] / times[baseline])
    return statistics.median(ratios)
