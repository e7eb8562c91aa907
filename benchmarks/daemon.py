"""A ``weightd serve`` process for the benchmarks: started with ``--free-on-stop`` (every scenario starts cold,
and a stopped daemon leaves no arena in /dev/shm), returned once it answers."""

from __future__ import annotations

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
