"""Operators that make a GPU wait for the host, or the host for the GPU, seen on any device (the CPU too).

``torch.cuda.set_sync_debug_mode`` finds these only on CUDA; this dispatch mode names them wherever the tests run,
attributed to the engine's line that caused them, so a round trip added to the step loop fails on the CPU as well.
"""

import functools
import os
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostRoundTrips"]

_ENGINE = str(Path(__file__).resolve().parents[2] / "biasmap_engine")
_NOT_CALLERS = (os.path.realpath(os.path.dirname(torch.__file__)), os.path.realpath(__file__))
_A = torch.ops.aten
_SYNCS = {
    _A._local_scalar_dense.default: "a read of a value on the host (item, float, int, bool)",
    _A.is_nonzero.default: "a read of a value on the host (bool of a tensor)",
    _A.lift_fresh.default: "a tensor made from Python numbers (a blocking copy from the host)",
    _A.nonzero.default: "nonzero (its size is read on the host)",
    _A.masked_select.default: "masked_select (its size is read on the host)",
    _A._unique2.default: "unique (its size is read on the host)",
}
_INDEXING = {_A.index.Tensor, _A.index_put.default, _A.index_put_.default, _A._index_put_impl_.default}


class HostRoundTrips(TorchDispatchMode):
    """Collects ``(what, engine file:line)`` for each host round trip the engine's own lines cause (not ComfyUI's
    they call), outside ``finish`` (which reads the run's results once, at its end)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        what = _SYNCS.get(func)
        if func in _INDEXING and any(i is not None and i.dtype != torch.bool for i in args[1]):
            what = "an index tensor (from a Python list: a blocking copy from the host)"
        elif func in _INDEXING and any(i is not None for i in args[1]):
            what = "a boolean-mask index (its size is read on the host)"
        if what:
            # The innermost caller outside torch and this file: the engine's line, or ComfyUI's (not ours to count).
            stack = [f for f in traceback.extract_stack() if not _real(f.filename).startswith(_NOT_CALLERS)]
            engine = [f for f in stack if _real(f.filename).startswith(_ENGINE)]
            if stack and stack[-1] in engine and not any(f.name == "finish" for f in engine):
                self.found.append((what, f"{Path(stack[-1].filename).name}:{stack[-1].lineno}"))
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=None)
def _real(filename: str) -> str:
    return os.path.realpath(filename)  # the engine may be imported through a path such as tests/../biasmap_engine
