"""One conformance suite for every memory backend (as fsspec's tests/abstract does for filesystems).

Each backend in ``weightd.daemon.memory.BACKENDS`` must: allocate an arena the loader can fill; hand it over
as a descriptor that another process maps read-only (and cannot write through); release it; say its
capacity (the base of a percentage budget); let a restarted daemon adopt a completed arena (and refuse one
that is not intact, or another daemon's); remove unrecorded ones; and refuse what does not fit with
OutOfMemoryError. Backends that need hardware this machine lacks are skipped with the reason. Host memory
is tested on /dev/shm and on a hugetlbfs (where root may mount one), whose arenas are whole 2 MiB pages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from weightd.daemon.config import parse_memory_limit
from weightd.daemon.errors import OutOfMemoryError
from weightd.daemon.memory import BACKENDS, open_backend
from weightd.daemon.memory.base import AdoptionError, MemoryBackend

# Maps an inherited descriptor with the client's own code and prints a checksum; "write" then writes to it.
MAP_IN_CLIENT = r"""
import sys, torch
from weightd.client._mapping import map_arena
from weightd.v1 import weightd_pb2 as pb
fd, size = int(sys.argv[1]), int(sys.argv[2])
arena = map_arena(pb.MemoryHandle(host=pb.HostMemory(), size_bytes=size, descriptor_slot=0), [fd], None)
print(int(arena.to(torch.int64).sum()), flush=True)
if sys.argv[3] == "write":
    arena[0] = 1
    print("wrote", flush=True)
"""


@pytest.fixture(params=["tmpfs", "hugetlbfs"])
def arena_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory of /dev/shm, or a hugetlbfs of 32 MiB (2 MiB pages from the kernel's pool) mounted for the test
    where root may."""
    directory = Path(tempfile.mkdtemp(prefix="weightd-conformance-", dir="/dev/shm"))
    mounted = False
    try:
        if request.param == "hugetlbfs":
            request.getfixturevalue("huge_pages")
            mount = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M,size=32M,mode=700", "none",
                                    str(directory)], capture_output=True, text=True)
            if mount.returncode != 0:
                pytest.skip(f"cannot mount a hugetlbfs: {mount.stderr.strip()}")
            mounted = True
        yield directory
    finally:
        for path in directory.iterdir():
            path.unlink()
        if mounted:
            subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()


@pytest.fixture(params=sorted(BACKENDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def backend(kind: str, directory: Path, namespace: str = "conformance") -> MemoryBackend:
    return open_backend(kind, directory=directory, namespace=namespace)


def _whole_pages(directory: Path, size: int) -> int:
    page = os.statvfs(directory).f_bsize
    return -(-size // page) * page


def fill(arena_tensor: torch.Tensor) -> int:
    values = torch.arange(arena_tensor.numel(), dtype=torch.int64) % 251
    arena_tensor.copy_(values.to(torch.uint8))
    return int(values.sum())


def map_elsewhere(fd: int, size: int, mode: str = "read") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", MAP_IN_CLIENT, str(fd), str(size), mode], pass_fds=[fd],
                          capture_output=True, text=True, timeout=120)


def test_hand_over_and_map_read_only_in_another_process(kind: str, arena_dir: Path) -> None:
    memory = backend(kind, arena_dir)
    arena = memory.allocate(3 << 20, label="handover")
    # On a hugetlbfs an arena is whole pages (2 MiB): its size is all it takes.
    assert arena.kind == memory.kind == kind and arena.size == _whole_pages(arena_dir, 3 << 20)
    assert arena.handle().by_descriptor and arena.handle().size == arena.size and memory.device_uuid == ""
    checksum = fill(arena.tensor())
    fd = arena.export()
    try:
        read = map_elsewhere(fd, arena.size)
        assert read.returncode == 0, read.stderr
        assert int(read.stdout.split()[0]) == checksum
        write = map_elsewhere(fd, arena.size, "write")
        assert write.returncode == -signal.SIGSEGV and "wrote" not in write.stdout
    finally:
        os.close(fd)
    assert int(arena.tensor()[0]) == 0  # the attempted write changed nothing
    arena.release()
    assert list(arena_dir.iterdir()) == []
    arena.release()  # idempotent


def test_capacity_is_the_base_of_a_percentage_budget(kind: str, arena_dir: Path) -> None:
    memory = backend(kind, arena_dir)
    capacity = memory.capacity()
    assert capacity > 0
    assert parse_memory_limit("50%").of(capacity) == capacity // 2
    assert parse_memory_limit("1GiB").of(capacity) == 2**30


def test_adoption_after_restart(kind: str, arena_dir: Path) -> None:
    first = backend(kind, arena_dir)
    arena = first.allocate(1 << 20, label="adopt")
    checksum = fill(arena.tensor())
    name, size = arena.name, arena.size
    arena.detach()  # the daemon stops (or dies): the memory stays

    restarted = backend(kind, arena_dir)
    adopted = restarted.adopt(name, size)
    assert int(adopted.tensor().to(torch.int64).sum()) == checksum
    with pytest.raises(AdoptionError, match="manifest says"):
        restarted.adopt(name, size + 4096)
    with pytest.raises(AdoptionError, match="not an arena of this daemon"):
        backend(kind, arena_dir, namespace="another-daemon").adopt(name, size)
    with pytest.raises(AdoptionError, match="gone"):
        restarted.adopt(name.replace("adopt", "absent"), size)

    interrupted = restarted.allocate(4096, label="interrupted")
    interrupted.detach()
    assert restarted.remove_orphans(keep={name}) == [str(arena_dir / interrupted.name)]
    assert [p.name for p in arena_dir.iterdir()] == [name]
    adopted.release()


def test_an_arena_that_is_not_intact_is_not_adopted(kind: str, arena_dir: Path) -> None:
    memory = backend(kind, arena_dir)
    arena = memory.allocate(1 << 20, label="tampered")
    name = arena.name
    arena.detach()
    os.chmod(arena_dir / name, 0o644)
    with pytest.raises(AdoptionError, match="mode 644"):
        memory.adopt(name, 1 << 20)


def test_what_does_not_fit_is_out_of_memory(kind: str, arena_dir: Path) -> None:
    memory = backend(kind, arena_dir)
    with pytest.raises(OutOfMemoryError, match="evict models"):
        memory.allocate(memory.capacity() * 2, label="too-big")
    assert list(arena_dir.iterdir()) == []
