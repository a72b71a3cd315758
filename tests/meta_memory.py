"""Peak memory of a call from tensor shapes alone (``meta`` tensors), for the memory tests."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created by the ops run under it, from shapes alone.

    On ``meta`` tensors nothing is allocated or computed, so a call at a size far beyond this
    machine's memory is accounted in milliseconds. Each op's outputs that are new storages add
    their bytes; a storage's bytes are given back when it is freed. Storages that exist before
    (inputs, in-place results, views) are not counted. Like the profiler replay, temporaries
    made and freed inside one op are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self.seen.add(t.untyped_storage())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                st = t.untyped_storage()
                self.seen.add(st)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, st.nbytes())
        return out


def meta_peak(fn) -> int:
    with LiveBytes() as acct:
        fn()
    return acct.peak
