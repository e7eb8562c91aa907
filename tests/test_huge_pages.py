"""Which pages an arena gets: the daemon reads its --shm-dir's tmpfs ``huge=`` policy, warns when arenas would be
filled one 4 KiB page at a time, and on a ``huge=within_size`` or ``huge=advise`` tmpfs its arenas are mapped in
2 MiB pages (by the daemon and by the engines that attach); on a hugetlbfs they are whole pages of the kernel's
pool."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from weightd import client
from weightd.daemon.memory.host import huge_page_policy

from tests.conftest import Model, in_own_mount, run_client

MOUNTINFO = """\
21 1 0:20 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u
24 21 0:22 / /dev/shm rw,nosuid,nodev - tmpfs shm rw,size=65536k
25 21 0:23 / /run/arenas rw,relatime shared:7 - tmpfs tmpfs rw,size=1048576k,huge=within_size,mode=755
26 21 8:1 / /data rw,relatime - ext4 /dev/sda1 rw
27 25 0:24 / /run/arenas/over rw,relatime - tmpfs tmpfs rw,size=1024k,huge=always
28 21 0:25 / /run/with\\040space rw - tmpfs tmpfs rw,huge=advise
29 21 0:26 / /dev/shm rw - tmpfs tmpfs rw,huge=always
"""

SHMEM_NEVER = "always within_size advise [never] deny force\n"
SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


@pytest.mark.parametrize(("directory", "policy"), [
    ("/run/arenas", "within_size"),
    ("/run/arenas/model/", "within_size"),  # below the mount point
    ("/run/arenas/over/x", "always"),  # the innermost mount
    ("/run/arenasx", ""),  # a sibling whose name only starts like the mount point: the overlay root
    ("/dev/shm", "always"),  # mounted over: the later mount is the one seen
    ("/data/models", ""),
    ("/run/with space", "advise"),
])
def test_the_policy_is_the_innermost_tmpfs_mount_s(tmp_path: Path, directory: str, policy: str) -> None:
    mountinfo, shmem = tmp_path / "mountinfo", tmp_path / "shmem_enabled"
    mountinfo.write_text(MOUNTINFO)
    shmem.write_text(SHMEM_NEVER)
    assert huge_page_policy(Path(directory), mountinfo=mountinfo, shmem_enabled=shmem) == policy


def test_a_tmpfs_without_the_option_gets_small_pages_and_the_system_setting_can_override(tmp_path: Path) -> None:
    mountinfo, shmem = tmp_path / "mountinfo", tmp_path / "shmem_enabled"
    mountinfo.write_text("".join(MOUNTINFO.splitlines(keepends=True)[:-1]))  # /dev/shm without huge=, not over
    shmem.write_text(SHMEM_NEVER)
    assert huge_page_policy(Path("/dev/shm"), mountinfo=mountinfo, shmem_enabled=shmem) == "never"
    shmem.write_text("always within_size advise never deny [force]\n")
    assert huge_page_policy(Path("/dev/shm"), mountinfo=mountinfo, shmem_enabled=shmem) == "always"
    shmem.write_text("always within_size advise never [deny] force\n")
    assert huge_page_policy(Path("/run/arenas"), mountinfo=mountinfo, shmem_enabled=shmem) == "never"
    assert huge_page_policy(Path("/data"), mountinfo=mountinfo, shmem_enabled=shmem) == ""
    # Kernels without transparent huge pages have no such file: the mount's own option stands.
    assert huge_page_policy(Path("/run/arenas"), mountinfo=mountinfo, shmem_enabled=tmp_path / "absent") == (
        "within_size")


def test_this_machine_s_dev_shm_is_a_tmpfs_with_a_known_policy() -> None:
    assert huge_page_policy(Path("/dev/shm")) in {"never", "always", "within_size", "advise"}


# Attach; compare with safetensors; report, over the mappings the tensors lie in, their size and how the kernel maps
# them: ShmemPmdMapped (a tmpfs's 2 MiB pages), Shared_Hugetlb and Private_Hugetlb (a hugetlbfs's), KernelPageSize.
ATTACH_AND_READ_MAPPINGS = r"""
import glob, json, sys
import torch
from safetensors.torch import load_file
from weightd import client

model = client.attach(sys.argv[1], target=sys.argv[2], timeout=120)
expected = {}
for f in glob.glob(sys.argv[3] + "/*.safetensors"):
    expected.update(load_file(f))
mismatched = [n for n, t in expected.items() if not torch.equal(model.tensors[n], t)]
pointers = [t.data_ptr() for t in model.tensors.values()]
mapping = {"size": 0, "ShmemPmdMapped": 0, "Shared_Hugetlb": 0, "Private_Hugetlb": 0, "KernelPageSize": 0}
inside = False
for line in open("/proc/self/smaps"):
    field = line.split()
    if "-" in field[0]:
        low, high = (int(x, 16) for x in field[0].split("-"))
        inside = any(low <= p < high for p in pointers)
        mapping["size"] += high - low if inside else 0
    elif inside and field[0].rstrip(":") in mapping:
        name, value = field[0].rstrip(":"), int(field[1]) * 1024
        mapping[name] = max(mapping[name], value) if name == "KernelPageSize" else mapping[name] + value
print(json.dumps({"mismatched": mismatched, "tensors": len(model.tensors), "mapping": mapping}))
"""


@pytest.mark.parametrize("policy", ["within_size", "advise"])
def test_arenas_on_a_huge_tmpfs_are_mapped_in_2_mib_pages(daemon_factory, tmp_path: Path, llama_model: Model,
                                                            policy: str) -> None:
    """huge=advise too: the daemon advises its mapping before faulting a new arena in, and the engines' mappings
    of those pages are 2 MiB ones without advising theirs."""
    if not SHMEM_ENABLED.exists() or "[deny]" in SHMEM_ENABLED.read_text():
        pytest.skip("this kernel gives tmpfs no huge pages")
    shm = tmp_path / "huge-shm"
    wrapper = in_own_mount(shm, f"size=256m,huge={policy}")
    daemon = daemon_factory(extra_args=("--shm-dir", str(shm), "--free-on-stop", "true"), wrapper=wrapper)
    seen = run_client(ATTACH_AND_READ_MAPPINGS, str(llama_model.directory), daemon.target, str(llama_model.directory))
    assert seen["mismatched"] == [] and seen["tensors"] == len(llama_model.tensors)
    # The arena's whole 2 MiB-aligned part (a within_size tail smaller than a huge page stays in 4 KiB pages).
    assert seen["mapping"]["ShmemPmdMapped"] >= (llama_model.nbytes // 2**21 - 1) * 2**21, seen
    assert "4 KiB pages" not in daemon.log.read_text()


def test_the_daemon_warns_when_arenas_get_4_kib_pages(daemon_factory, tmp_path: Path) -> None:
    if SHMEM_ENABLED.exists() and re.search(r"\[(force|deny)\]", SHMEM_ENABLED.read_text()):
        pytest.skip("this kernel's shmem_enabled overrides every tmpfs's huge= option")
    shm = tmp_path / "small-pages"
    daemon = daemon_factory(extra_args=("--shm-dir", str(shm)), wrapper=in_own_mount(shm, "size=16m,huge=never"))
    log = daemon.log.read_text()
    assert f"arenas in {shm} get 4 KiB pages (tmpfs huge=never)" in log
    assert "README, 'Huge pages for arenas'" in log


def test_the_daemon_warns_when_its_hugetlbfs_has_no_pages(daemon_factory, tmp_path: Path, llama_model: Model) -> None:
    """A hugetlbfs of 1 GiB pages where none are reserved: the daemon serves, says why no load can fit, and an
    attach (with a budget that is not what stops it) is RESOURCE_EXHAUSTED saying to reserve pages."""
    pool = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")
    if not pool.exists() or int(pool.read_text()) != 0:
        pytest.skip("needs a kernel with 1 GiB huge pages and none reserved")
    shm = tmp_path / "no-pages"
    daemon = daemon_factory(extra_args=("--shm-dir", str(shm), "--host-memory-limit", "1GiB"),
                            wrapper=in_own_mount(shm, "pagesize=1G", filesystem="hugetlbfs"))
    assert (f"arenas in {shm} take huge pages from the kernel's pool, which holds none of that size"
            in daemon.log.read_text())
    with pytest.raises(client.ResourceExhaustedError, match=r"has 0 free; .* reserve more huge pages"):
        client.attach(str(llama_model.directory), target=daemon.target)
    assert daemon.models() == []


# For the scripts below: one field of /proc/self/smaps, in bytes, for the mapping that holds ``address``.
SMAPS_FIELD = r"""
def smaps_field(address, name):
    inside = False
    for line in open("/proc/self/smaps"):
        field = line.split()
        if "-" in field[0]:
            low, high = (int(x, 16) for x in field[0].split("-"))
            inside = low <= address < high
        elif inside and field[0] == name + ":":
            return int(field[1]) * 1024
"""

# In its own mount namespace: allocate on a 4 KiB-page and a huge-page tmpfs; report what each arena's creation
# left mapped and allocated; then fill a 16 MiB tmpfs past its end both ways.
RESERVE = SMAPS_FIELD + r"""
import json, os, sys
from pathlib import Path
from weightd.daemon.errors import OutOfMemoryError
from weightd.daemon.memory import host
from weightd.daemon.memory.host import HostArena, HostMemory, Reservation

def resident_shared():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssShmem:"))) * 1024

report = {}
for name in ("small", "huge", "advise"):
    before = resident_shared()
    arena = HostMemory(directory=Path(sys.argv[1]) / name, namespace="t").allocate(24 << 20, label=name)
    report[name] = {"mapped": resident_shared() - before, "allocated": os.stat(arena.path).st_blocks * 512,
                    "zero": not bool(arena.tensor().any()),
                    "huge_mapped": smaps_field(arena.tensor().data_ptr(), "ShmemPmdMapped")}
    arena.release()
full = Path(sys.argv[1]) / "full"
(full / "other").write_bytes(b"x" * (10 << 20))  # another writer's 10 MiB of the 16
host._free_bytes = lambda directory, pool: 1 << 40  # as if that writer came after the free-space check
for reservation in (Reservation.FAULT_IN, Reservation.FALLOCATE):
    try:
        HostArena(full / "arena", 8 << 20, create=True, reservation=reservation)
    except (OSError, OutOfMemoryError) as e:
        report[f"full, {reservation.name}"] = [type(e).__name__, str(e), sorted(p.name for p in full.iterdir())]
try:
    HostMemory(directory=full, namespace="t").allocate(8 << 20, label="late")
except OutOfMemoryError as e:
    report["full, allocate"] = str(e)
print(json.dumps(report))
"""


def test_each_tmpfs_gets_the_cheaper_reservation_and_a_full_one_is_an_error_not_sigbus(tmp_path: Path) -> None:
    """4 KiB pages are faulted in at creation (mapped and allocated: the streamer's writes take no faults);
    huge pages are reserved with posix_fallocate (allocated, mapped by the writers); on a huge=advise tmpfs
    the daemon advises its mapping and faults it in, in 2 MiB pages. A tmpfs that fills
    between the free-space check and the reservation fails that arena, removes its file, and the process
    lives on."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root or CAP_SYS_ADMIN)")
    if not SHMEM_ENABLED.exists() or re.search(r"\[(force|deny)\]", SHMEM_ENABLED.read_text()):
        pytest.skip("this kernel's shmem_enabled overrides every tmpfs's huge= option")
    mounts = " && ".join(f"mkdir {tmp_path}/{name} && mount -t tmpfs -o {options} tmpfs {tmp_path}/{name}"
                         for name, options in (("small", "size=32m,huge=never"), ("huge", "size=32m,huge=within_size"),
                                               ("advise", "size=32m,huge=advise"), ("full", "size=16m,huge=never")))
    done = subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", sys.executable, "-c", RESERVE,
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    size = 24 << 20
    assert report["small"] == {"mapped": size, "allocated": size, "zero": True, "huge_mapped": 0}
    assert report["huge"]["allocated"] >= size and report["huge"]["zero"]
    assert report["huge"]["mapped"] == 0
    # A 2 MiB page the kernel cannot find at once (memory too fragmented to compact) falls back to 4 KiB ones.
    assert report["advise"]["mapped"] == report["advise"]["allocated"] == size and report["advise"]["zero"]
    assert report["advise"]["huge_mapped"] >= size // 2, report["advise"]
    assert report["full, FAULT_IN"] == [
        "OutOfMemoryError", f"faulting in {8 << 20} bytes of host memory failed: its tmpfs is full or its huge "
        "page limit was reached; evict models (weightd evict URI) or give the arenas more room", ["other"]]
    assert report["full, FALLOCATE"][0] == "OSError" and "No space left" in report["full, FALLOCATE"][1]
    assert report["full, FALLOCATE"][2] == ["other"]
    assert report["full, allocate"].startswith(f"arena for late in {tmp_path}/full: faulting in")


def test_arenas_on_a_hugetlbfs_take_the_pool_s_2_mib_pages_and_engines_map_them(
    daemon_factory, tmp_path: Path, llama_model: Model, huge_pages: int
) -> None:
    """A hugetlbfs (systemd's /dev/hugepages, Kubernetes' ``medium: HugePages``) gives arenas 2 MiB pages from
    the kernel's pool without a tmpfs mounted huge=: each arena is whole pages, and an engine's read-only
    mapping of it is a hugetlb one."""
    shm = tmp_path / "hugetlbfs"
    wrapper = in_own_mount(shm, "pagesize=2M,size=64M", filesystem="hugetlbfs")
    daemon = daemon_factory(extra_args=("--shm-dir", str(shm), "--free-on-stop", "true"), wrapper=wrapper)
    seen = run_client(ATTACH_AND_READ_MAPPINGS, str(llama_model.directory), daemon.target, str(llama_model.directory))
    assert seen["mismatched"] == [] and seen["tensors"] == len(llama_model.tensors)
    mapping = seen["mapping"]
    assert mapping["KernelPageSize"] == 2 << 20 and mapping["size"] % (2 << 20) == 0, mapping
    assert mapping["size"] >= llama_model.nbytes
    assert mapping["Shared_Hugetlb"] + mapping["Private_Hugetlb"] >= llama_model.nbytes // (2 << 20) * (2 << 20)
    assert "4 KiB pages" not in daemon.log.read_text()


# In its own mount namespace: arenas on a hugetlbfs with a size limit and on one without (the pool is the limit).
RESERVE_HUGETLB = SMAPS_FIELD + r"""
import json, os, sys
from pathlib import Path
from weightd.daemon.errors import OutOfMemoryError
from weightd.daemon.memory import host
from weightd.daemon.memory.host import HostMemory

PAGE = 2 << 20

def refused(memory, size):
    try:
        memory.allocate(size, label="big")
    except OutOfMemoryError as e:
        return str(e)

report = {}
sized = HostMemory(directory=Path(sys.argv[1]) / "sized", namespace="t")
arena = sized.allocate(3 << 20, label="three-mib")
adopted = sized.adopt(arena.name, arena.size)
report["sized"] = {
    "capacity": sized.capacity(), "size": arena.size, "allocated": os.stat(arena.path).st_blocks * 512,
    "zero": not bool(arena.tensor().any()), "page": smaps_field(arena.tensor().data_ptr(), "KernelPageSize"),
    "adopted": adopted.size, "empty": sized.allocate(0, label="empty").size, "refused": refused(sized, 3 << 20),
}
adopted.detach()
pool = HostMemory(directory=Path(sys.argv[1]) / "pool", namespace="t")
pages = host.HugePagePool(PAGE)
unclaimed = pages.unclaimed()
report["pool"] = {"capacity": pool.capacity(), "total": pages.pages("nr_hugepages") * PAGE,
                  "unclaimed": unclaimed * PAGE, "refused": refused(pool, (unclaimed + 1) * PAGE)}
host._free_bytes = lambda directory, pool: 1 << 50  # as if another process took the pages after the check
report["pool"]["taken"] = refused(pool, (unclaimed + 1) * PAGE)
report["pool"]["left"] = sorted(p.name for p in (Path(sys.argv[1]) / "pool").iterdir())
print(json.dumps(report))
"""


def test_a_hugetlbfs_arena_is_whole_pages_and_a_pool_too_small_is_an_error(tmp_path: Path, huge_pages: int) -> None:
    """An arena's file is whole 2 MiB pages (even an empty one: its mapping takes one), faulted in and zero, and
    it is adopted after a restart as a tmpfs one is. The room is the mount's size= limit or, without one, the
    pool's unclaimed pages; an arena that does not fit is OutOfMemoryError saying to reserve more pages, also
    when another process takes them between the check and the mapping."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root or CAP_SYS_ADMIN)")
    mounts = " && ".join(f"mkdir {tmp_path}/{name} && mount -t hugetlbfs -o {options} none {tmp_path}/{name}"
                         for name, options in (("sized", "pagesize=2M,size=8M"), ("pool", "pagesize=2M")))
    done = subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", sys.executable, "-c",
                           RESERVE_HUGETLB, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    page = 2 << 20
    remedy = "evict models (weightd evict URI) or reserve more huge pages (vm.nr_hugepages)"
    assert report["sized"] == {
        "capacity": 8 << 20, "size": 4 << 20, "allocated": 4 << 20, "zero": True, "page": page, "adopted": 4 << 20,
        "empty": page,
        "refused": f"arena for big needs {4 << 20} bytes but {tmp_path}/sized has {page} free; {remedy}",
    }
    pool = report["pool"]
    assert pool["capacity"] == pool["total"] and pool["unclaimed"] >= (huge_pages - 3) * page  # 3 taken above
    size = pool["unclaimed"] + page
    assert pool["refused"] == (f"arena for big needs {size} bytes but {tmp_path}/pool has {pool['unclaimed']} free; "
                               f"{remedy}")
    assert pool["taken"] == (f"arena for big needs {size} bytes but {tmp_path}/pool is full (another writer took the "
                             f"space first); {remedy}")
    assert pool["left"] == []
