"""Operations that make a GPU wait for the host, or the host for the GPU, seen on any device (the CPU too).

``torch.cuda.set_sync_debug_mode`` finds these only on CUDA; this spy names them wherever the tests run, attributed
to the engine's line that caused them, so a round trip added to the step loop fails on the CPU as well. Operators are
seen in the dispatcher; reads of a tensor into Python (``tolist``, ``cpu``, ``numpy``), which a CPU tensor answers
without dispatching, at the Python level. Not seen: ``.to(device)`` of a tensor made on the host, which on the CPU
cannot be told from a move to the device the tensor is already on, and a round trip inside the engine's own
``__torch_function__`` (the small-grid convolution's), whose frame is skipped so that ComfyUI's calls it hands on
are not counted as the engine's.
"""

import functools
import os
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ENGINE", "HostRoundTrips"]

ENGINE = str(Path(__file__).resolve().parents[2] / "biasmap_engine")
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
# The session's finish reads the run's results once, at its end; _start_latents the latent it starts from, once,
# before the first step (a latent ComfyUI keeps on the CPU between nodes, so no wait for a GPU there).
_ONCE_A_RUN = ("finish", "_start_latents")
_READS = {torch.Tensor.tolist: "tolist (a copy to the host)", torch.Tensor.cpu: "cpu (a copy to the host)",
          torch.Tensor.numpy: "numpy (a copy to the host)"}


class HostRoundTrips:
    """Collects ``(what, engine file:line)`` for each host round trip the engine's own lines cause (not ComfyUI's
    they call), outside the functions that read once a run, not a step (_ONCE_A_RUN)."""

    def __init__(self):
        self.found: list[tuple[str, str]] = []
        self._modes = (_Operators(self._note), _Reads(self._note))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def _note(self, what: str) -> None:
        # The innermost caller outside torch, this file and the modes that hand calls on (the engine's small-grid
        # convolution): the engine's line, or ComfyUI's (not ours to count).
        stack = [f for f in traceback.extract_stack() if not _real(f.filename).startswith(_NOT_CALLERS)
                 and f.name not in ("__torch_function__", "__torch_dispatch__")]
        engine = [f for f in stack if _real(f.filename).startswith(ENGINE)]
        if stack and stack[-1] in engine and not any(f.name in _ONCE_A_RUN for f in engine):
            self.found.append((what, f"{Path(stack[-1].filename).name}:{stack[-1].lineno}"))


class _Operators(TorchDispatchMode):
    def __init__(self, note):
        super().__init__()
        self.note = note

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        what = _SYNCS.get(func)
        if func in _INDEXING and any(i is not None and i.dtype != torch.bool for i in args[1]):
            what = "an index tensor (from a Python list: a blocking copy from the host)"
        elif func in _INDEXING and any(i is not None for i in args[1]):
            what = "a boolean-mask index (its size is read on the host)"
        if what:
            self.note(what)
        return func(*args, **(kwargs or {}))


class _Reads(TorchFunctionMode):
    def __init__(self, note):
        super().__init__()
        self.note = note

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.note(_READS[func])
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=None)
def _real(filename: str) -> str:
    return os.path.realpath(filename)  # the engine may be imported through a path such as tests/../biasmap_engine
