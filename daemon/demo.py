"""``weightd demo``: the whole path on one machine with no cloud account.

Generates a sharded Llama-shaped model in a temporary directory, starts a daemon, attaches the model from
two separate client processes (the first one's attach streams it in; the second maps what is resident),
checks every tensor against a safetensors read and that the views point into the shared mapping, then stops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightd import client
from weightd.daemon.synthetic import write_synthetic_model

# Runs in a separate process: imports only the client.
_CLIENT = r"""
import glob, json, sys, time
import torch
from safetensors.torch import load_file
from weightd import client
t0 = time.perf_counter()
model = client.attach(sys.argv[1], target=sys.argv[2], timeout=600)
attach_s = time.perf_counter() - t0
maps = [line.split()[0] for line in open("/proc/self/maps") if "/weightd-" in line]
ranges = [tuple(int(x, 16) for x in m.split("-")) for m in maps]
inside = sum(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in model.tensors.values())
equal = 0
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    equal += sum(torch.equal(model.tensors[n], t) for n, t in load_file(f).items())
print(json.dumps({"attach_s": attach_s, "tensors": len(model.tensors), "inside": inside, "equal": equal}))
model.close()
"""


def run_demo(*, size_bytes: int) -> int:
    with tempfile.TemporaryDirectory(prefix="weightd-demo-") as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        started = time.perf_counter()
        tensors = write_synthetic_model(model_dir, total_bytes=size_bytes, shards=3)
        nbytes = sum(t.nbytes for t in tensors.values())
        print(f"generated {len(tensors)} tensors ({nbytes / 2**20:.0f} MiB, 3 shards + index) in "
              f"{time.perf_counter() - started:.1f} s at {model_dir}")
        socket = root / "weightd.sock"
        target = f"unix://{socket}"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "weightd.daemon", "serve", "--socket", str(socket),
             "--cache-dir", str(root / "cache"), "--log-level", "WARNING", "--free-on-stop", "true"],
        )
        try:
            _wait_for_daemon(target, daemon)
            runs = [_attach_in_new_process(str(model_dir), target) for _ in range(2)]
            (resident,) = client.list_models(target=target)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    cold, warm = runs
    ok = all(r["inside"] == r["tensors"] == r["equal"] == len(tensors) for r in runs)
    print(f"process 1: attach streamed the model into the daemon and mapped it in {cold['attach_s']:.2f} s")
    print(f"process 2: attach of the resident model took {warm['attach_s'] * 1000:.0f} ms "
          f"({cold['attach_s'] / warm['attach_s']:.0f}x faster), no second read, no second copy")
    print(f"storage bytes read: {resident.storage_bytes_read} for {nbytes} bytes of weights; "
          f"every tensor equal to safetensors and inside the shared mapping: {'yes' if ok else 'NO'}")
    return 0 if ok and resident.storage_bytes_read == nbytes else 1


def _wait_for_daemon(target: str, daemon: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {daemon.returncode}")
        try:
            client.list_models(target=target)
            return
        except client.UnavailableError:
            time.sleep(0.1)
    raise RuntimeError(f"the daemon did not answer on {target} within {timeout} s")


def _attach_in_new_process(model_dir: str, target: str) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", _CLIENT, model_dir, target], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, float] = json.loads(output.splitlines()[-1])
    return result
