"""The cyclic garbage collector paused while loads run.

A load creates a few objects per tensor (header entries, plan blocks and targets, arena slots) that live until
it ends or as long as the model stays. The collector's young collections pass them on and its full
collections walk all of them again each time: at 100k tensors that was 1.0-1.4 s of a 2.5-3 s plan, holding the
GIL (docs/benchmarks.md). Reference counting still frees whatever a load drops while the collector is paused;
only reference cycles wait, until the last running load ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Pause:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.resume = False  # whether the collector ran when the first holder paused it

    def enter(self) -> None:
        with self.lock:
            if self.holders == 0:
                self.resume = gc.isenabled()
                gc.disable()
            self.holders += 1

    def leave(self) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders == 0 and self.resume:
                gc.enable()


_PAUSE = _Pause()


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic garbage collection in this process until every holder of this pause has left it."""
    _PAUSE.enter()
    try:
        yield
    finally:
        _PAUSE.leave()
