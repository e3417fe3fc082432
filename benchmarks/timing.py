"""Wall-clock medians for the benchmark scripts (imported from this folder, which Python puts on the path)."""

import statistics
import time

import torch

__all__ = ["median_seconds"]


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
