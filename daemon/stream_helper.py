"""A child process that streams one load with its own streamer settings: ``python -m weightd.daemon.stream_helper``.

libstreamer reads its concurrency from the process environment when a streamer starts, and nothing else sets
it. The daemon runs loads on several threads, where changing its own environment would race with every
native thread that reads it (setenv is not thread-safe), so a load that asks for a different concurrency
streams here instead: a process started with that environment, writing into the daemon's shared arenas.

Protocol: the daemon pickles a ``HelperJob`` to stdin and keeps stdin open; this process answers with one
line per event on stdout (``loader.HELPER_*``) and exits when stdin closes, even mid-stream.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from typing import BinaryIO

from weightd.daemon.loader import HELPER_DONE, HELPER_FAILED, HELPER_LANDED, HelperJob, fetch_into
from weightd.daemon.memory.host import map_for_writing


def main() -> int:
    # The streamer's own logging may write to fd 1: give it stderr, and keep the protocol on a private copy.
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    job: HelperJob = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_exit_when_closed, args=(sys.stdin.buffer,), daemon=True).start()
    destinations = [
        map_for_writing(handle, layout.size) for handle, layout in zip(job.handles, job.plan.layouts, strict=True)
    ]

    def reply(kind: str, detail: str = "") -> None:  # called only from this thread (see _RangeReader.wait)
        replies.write(f"{kind} {detail}".rstrip().encode() + b"\n")

    try:
        fetch_into(destinations, job.paths, job.plan, memory_limit=job.memory_limit,
                   on_progress=lambda n: reply(HELPER_LANDED, str(n)))
    except ValueError as e:
        reply(HELPER_FAILED, " ".join(str(e).split()))
        return 1
    reply(HELPER_DONE)
    return 0


def _exit_when_closed(stdin: BinaryIO) -> None:
    stdin.read()
    os._exit(1)  # the daemon went away or gave up on this load: stop streaming now


if __name__ == "__main__":
    sys.exit(main())
