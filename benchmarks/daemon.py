"""A ``weightd serve`` process for the benchmarks: started with ``--free-on-stop`` (every scenario starts cold,
and a stopped daemon leaves no arena in /dev/shm), returned once it answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from weightd import client

from tests.storage_servers import stop_process


class Daemon:
    def __init__(self, root: Path, env: Mapping[str, str] | None = None, *, extra_args: Sequence[str] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "w.sock"
        self.target = f"unix://{self.socket}"
        self.log = root / "daemon.log"
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(self.socket), "--cache-dir",
             str(root / "cache"), "--log-level", "WARNING", "--free-on-stop", "true", *extra_args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                client.list_models(target=self.target)
                return
            except client.UnavailableError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"daemon did not start: {self.log.read_text()[-3000:]}") from None
                time.sleep(0.05)

    def wait_until_idle(self, *, interval: float = 0.1, timeout: float = 10.0) -> None:
        """Return once the daemon has spent under 5 ms of CPU in ``interval``: its start-up work beside serving
        (warming every storage SDK, 0.3-0.7 s of CPU here, then freezing its heap) is done, as a node's daemon is
        when an engine first asks. The streamer alone is timed after its imports alike."""
        last = cpu_seconds(self.process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = cpu_seconds(self.process.pid)
            if now - last < 0.005:
                return
            last = now

    def private_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) * 1024

    def settled_private_bytes(self, *, interval: float = 0.25, timeout: float = 10.0) -> int:
        """``private_bytes`` once two readings ``interval`` apart agree within 1 MiB. A load returns before its
        streamer has ended: that ends on a thread of its own and frees the storage clients' buffers (about the
        model's size for a 1 GB load from SeaweedFS) tenths of a second later."""
        last = self.private_bytes()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = self.private_bytes()
            if abs(now - last) < 1 << 20:
                break
            last = now
        return last

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
