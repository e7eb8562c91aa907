"""The garbage collector's pause during loads: held by several loads at once, resumed by the last to end, and
never turned on where it was off before."""

from __future__ import annotations

import gc
import threading

from weightd.daemon.gc_pause import collection_paused


def test_paused_until_the_last_holder_leaves() -> None:
    assert gc.isenabled()
    first_in, second_out = threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        first_in.wait()
        with collection_paused():
            seen.append(gc.isenabled())
        second_out.set()

    thread = threading.Thread(target=second)
    thread.start()
    with collection_paused():
        first_in.set()
        second_out.wait()
        seen.append(gc.isenabled())  # the second holder left; this one still holds the pause
    thread.join()
    assert seen == [False, False]
    assert gc.isenabled()


def test_a_pause_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_inside_resumes_collection() -> None:
    try:
        with collection_paused():
            raise RuntimeError("load failed")
    except RuntimeError:
        pass
    assert gc.isenabled()
