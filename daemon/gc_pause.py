"""The cyclic garbage collector paused while loads run.

A load creates a few objects per tensor (header entries, plan blocks and targets, arena slots) that live until
it ends or as long as the model stays. The collector's young collections pass them on and its full
collections walk all of them again each time: at 100k tensors that was 1.0-1.4 s of a 2.5-3 s plan, holding the
GIL (docs/benchmarks.md). Reference counting still frees whatever a load drops while the collector is paused;
only reference cycles wait, until the last running load ends. Work that would walk a load's objects (the
start-up's collect-and-freeze) waits for it too: ``when_no_load_runs``.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class _Pause:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.resume = False  # whether the collector ran when the first holder paused it
        self.deferred: list[Callable[[], None]] = []  # to run when the last holder leaves

    def enter(self) -> None:
        with self.lock:
            if self.holders == 0:
                self.resume = gc.isenabled()
                gc.disable()
            self.holders += 1

    def leave(self) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders:
                return
            if self.resume:
                gc.enable()
            deferred, self.deferred = self.deferred, []
        for action in deferred:
            try:
                action()
            except Exception:  # the load that left has succeeded or failed on its own; this is not its error
                logger.exception("work deferred until no load ran failed")

    def when_idle(self, action: Callable[[], None]) -> None:
        with self.lock:
            if self.holders:
                self.deferred.append(action)
                return
        action()


_PAUSE = _Pause()


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic garbage collection in this process until every holder of this pause has left it."""
    _PAUSE.enter()
    try:
        yield
    finally:
        _PAUSE.leave()


def when_no_load_runs(action: Callable[[], None]) -> None:
    """Run ``action`` now if nothing holds the pause, else on the thread of the last holder to leave it."""
    _PAUSE.when_idle(action)
