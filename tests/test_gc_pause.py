"""The garbage collector's pause during loads: held by several loads at once, resumed by the last to end, and
never turned on where it was off before; work kept from running loads waits for the last; and a load and its
eviction leave no cycles of weightd's or torch's objects, which a pause (or the start-up's freeze) would keep."""

from __future__ import annotations

import asyncio
import gc
import mmap
import threading
from pathlib import Path

import pytest
import torch
from weightd.daemon.gc_pause import collection_paused, when_no_load_runs
from weightd.daemon.loader import LoadSettings
from weightd.daemon.manifests import ManifestStore
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.metrics import Metrics
from weightd.daemon.registry import Registry
from weightd.daemon.service import status_name
from weightd.daemon.synthetic import write_synthetic_model


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


def test_work_waits_for_the_last_running_load() -> None:
    ran: list[str] = []
    when_no_load_runs(lambda: ran.append("idle"))
    assert ran == ["idle"]  # nothing held the pause: at once
    with collection_paused():
        with collection_paused():
            when_no_load_runs(lambda: ran.append("deferred"))
        assert ran == ["idle"]  # one load still runs
    assert ran == ["idle", "deferred"]
    with collection_paused():
        pass
    assert ran == ["idle", "deferred"]  # once only


def test_deferred_work_that_fails_is_not_the_loads_error(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("freeze failed")

    with collection_paused():
        when_no_load_runs(fail)
    assert "work deferred until no load ran failed" in caplog.text
    assert gc.isenabled()


@pytest.mark.parametrize("tp_size", [1, 2])
def test_a_load_and_its_eviction_leave_no_cycles(tmp_path: Path, tp_size: int) -> None:
    directory = tmp_path / "model"
    write_synthetic_model(directory, total_bytes=8 << 20, shards=2, dtypes=("bf16", "fp32"))
    (tmp_path / "shm").mkdir()

    async def load_and_evict() -> None:
        registry = Registry(
            HostMemory(directory=tmp_path / "shm", namespace="cycles"), host_budget=1 << 30, gpus=[],
            gpus_unavailable="", keep_host_tier=True, manifests=ManifestStore(tmp_path / "cache" / "arenas"),
            cache_dir=tmp_path / "cache", settings=LoadSettings(memory_limit=64 << 20), max_parallel_loads=2,
            metrics=Metrics(status_of=status_name),
        )
        keys = [registry.key(str(directory), tp_size=tp_size, rank=rank, rules=(), device_uuid="")
                for rank in range(tp_size)]
        await registry.ensure(keys)
        registry.evict(str(directory))
        await registry.close(keep_arenas=False, timeout=5)

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        asyncio.run(load_and_evict())
        gc.collect()
        kept = [o for o in gc.garbage if isinstance(o, (torch.Tensor, mmap.mmap))
                or type(o).__module__.startswith("weightd.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert kept == []
    assert list((tmp_path / "shm").iterdir()) == []
