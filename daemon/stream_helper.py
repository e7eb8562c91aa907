"""Streaming one load in a child process with its own streamer settings: ``python -m weightd.daemon.stream_helper``.

libstreamer reads its concurrency from the process environment when a streamer starts, and nothing else sets
it. The daemon runs loads on several threads, where changing its own environment would race with every
native thread that reads it (setenv is not thread-safe), so a load that asks for a different concurrency
streams here instead: a process started with that environment, writing into the daemon's arenas through
writable descriptors it inherits.

Protocol: the daemon pickles a ``HelperJob`` to stdin and keeps stdin open; the helper answers with one line
per event on stdout (``HELPER_*``) and exits when stdin closes, even mid-stream.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from weightd.daemon.memory.base import FillableArena, map_writable
from weightd.daemon.plan import LoadPlan
from weightd.daemon.streaming import FillCallback, StreamingError, fetch_into

# One line per message from the helper to the daemon: "<kind> <detail>".
HELPER_LANDED, HELPER_FILLED, HELPER_FAILED, HELPER_DONE = "landed", "filled", "failed", "done"
HELPER_EXIT_TIMEOUT_S = 10
# Object-store clients and file queue depth; RUNAI_STREAMER_CONCURRENCY fills whichever is unset.
CONCURRENCY_OVERRIDES = ("RUNAI_STREAMER_OBJ_CONCURRENCY", "RUNAI_STREAMER_FS_QUEUE_DEPTH")


@dataclass(frozen=True)
class HelperJob:
    """What the helper needs to fill arenas it did not allocate: sent to it through a pipe."""

    paths: list[str]
    plan: LoadPlan
    descriptors: list[int]  # inherited writable descriptors, one per arena of the plan
    memory_limit: int
    direct_piece_min: int
    read_through_gap: int
    report_fills: bool  # whether the daemon copies filled regions on (to a GPU) as they land


def process_concurrency_is(concurrency: int) -> bool:
    """Whether this process's streamer settings already give ``concurrency`` storage clients."""
    return os.environ.get("RUNAI_STREAMER_CONCURRENCY") == str(concurrency) and not any(
        name in os.environ for name in CONCURRENCY_OVERRIDES
    )


def fetch_in_helper(
    arenas: list[FillableArena],
    paths: list[str],
    plan: LoadPlan,
    *,
    memory_limit: int,
    direct_piece_min: int,
    read_through_gap: int,
    concurrency: int,
    on_progress: Callable[[int], None],
    on_filled: FillCallback | None = None,
) -> None:
    """Run ``fetch_into`` in a child process whose environment carries this load's streamer settings.

    Raises StreamingError when the child reports a failure or dies.
    """
    # The streamer's specific variables beat RUNAI_STREAMER_CONCURRENCY; this load's value must win.
    environment = {k: v for k, v in os.environ.items() if k not in CONCURRENCY_OVERRIDES}
    environment["RUNAI_STREAMER_CONCURRENCY"] = str(concurrency)
    descriptors = [a.fill_descriptor() for a in arenas]
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "weightd.daemon.stream_helper"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment, pass_fds=descriptors,
        )
    finally:
        for fd in descriptors:
            os.close(fd)  # the child holds its own copies
    assert process.stdin is not None and process.stdout is not None
    try:
        try:
            # Parent to its own child over an anonymous pipe: nothing untrusted is unpickled.
            job = HelperJob(paths, plan, descriptors, memory_limit, direct_piece_min, read_through_gap,
                            on_filled is not None)
            pickle.dump(job, process.stdin)
            process.stdin.flush()
        except BrokenPipeError:
            pass  # the helper died before reading its job: its exit status is reported below
        for line in process.stdout:
            kind, _, detail = line.decode().rstrip("\n").partition(" ")
            if kind == HELPER_LANDED:
                on_progress(int(detail))
            elif kind == HELPER_FILLED:
                if on_filled is not None:
                    arena_index, offset, length = map(int, detail.split())
                    on_filled(arena_index, offset, length)
            elif kind == HELPER_FAILED:
                raise StreamingError(detail)
            elif kind == HELPER_DONE:
                return
        raise StreamingError(f"the streaming helper exited with status {process.wait()} before the load finished")
    finally:
        with contextlib.suppress(BrokenPipeError):  # a dead helper cannot take the job's unflushed rest
            process.stdin.close()  # the helper exits when its stdin closes, even mid-stream
        try:
            process.wait(timeout=HELPER_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def main() -> int:
    # The streamer's own logging may write to fd 1: give it stderr, and keep the protocol on a private copy.
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    job: HelperJob = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_exit_when_closed, args=(sys.stdin.buffer,), daemon=True).start()
    destinations = [
        map_writable(fd, size)[1] for fd, size in zip(job.descriptors, job.plan.arena_sizes, strict=True)
    ]

    def reply(kind: str, detail: str = "") -> None:  # called only from this thread (see fetch_into)
        replies.write(f"{kind} {detail}".rstrip().encode() + b"\n")

    try:
        fetch_into(destinations, job.paths, job.plan, memory_limit=job.memory_limit,
                   direct_piece_min=job.direct_piece_min, read_through_gap=job.read_through_gap,
                   on_progress=lambda n: reply(HELPER_LANDED, str(n)),
                   on_filled=(lambda i, o, n: reply(HELPER_FILLED, f"{i} {o} {n}")) if job.report_fills else None)
    except StreamingError as e:
        reply(HELPER_FAILED, " ".join(str(e).split()))
        return 1
    reply(HELPER_DONE)
    return 0


def _exit_when_closed(stdin: BinaryIO) -> None:
    stdin.read()
    os._exit(1)  # the daemon went away or gave up on this load: stop streaming now


if __name__ == "__main__":
    sys.exit(main())
