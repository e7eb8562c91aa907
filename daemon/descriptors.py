"""The descriptor channel: hands a lease's arenas (and a large grant's tensor table) to its client as file
descriptors (SCM_RIGHTS).

gRPC carries the grant but cannot carry descriptors, so the daemon also listens on a Unix SOCK_SEQPACKET
socket beside its gRPC socket (its path is in every grant). Protocol, one packet each way per step:

1. the client sends ``{"lease_id": "..."}`` (JSON);
2. the daemon checks the peer (SO_PEERCRED against the allowed uids/gids) and that the lease is live, then
   sends ``{"total": N, "first_slot": i}`` packets, each carrying the descriptors of slots i, i+1, ... (at
   most ``MAX_DESCRIPTORS_PER_PACKET``), until all N are sent; or, on refusal, one
   ``{"error": "...", "code": "<gRPC status name>"}`` packet. Then it closes the connection.

Descriptors are the lease's arenas' read-only exports (``Arena.export``), then its grant's shared tensor
table (``SealedBytes``) when it has one; the daemon closes its copies once sent.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import struct
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from weightd.daemon.metrics import Metrics

logger = logging.getLogger(__name__)

# SCM_MAX_FD in the kernel is 253: one sendmsg carries at most that many descriptors.
MAX_DESCRIPTORS_PER_PACKET = 253
MAX_REQUEST_BYTES = 1024
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def descriptor_socket_path(grpc_socket: Path) -> Path:
    """``/run/weightd/weightd.sock`` -> ``/run/weightd/weightd.fds.sock``: same directory as the gRPC socket."""
    return grpc_socket.with_name(f"{grpc_socket.stem}.fds{grpc_socket.suffix}")


@dataclass(frozen=True)
class Peer:
    pid: int  # 0 when the peer is in a PID namespace the daemon cannot see
    uid: int
    gid: int


@dataclass(frozen=True)
class PeerPolicy:
    """Which peers may receive descriptors. Both sets empty: everyone who can connect (the socket's mode
    decides); otherwise a peer whose uid or primary gid is listed."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, peer: Peer) -> bool:
        return not (self.uids or self.gids) or peer.uid in self.uids or peer.gid in self.gids

    def describe(self) -> str:
        return (f"uids {sorted(self.uids) or 'none'}, gids {sorted(self.gids) or 'none'} "
                "(--allowed-uids, --allowed-gids)")


class Exportable(Protocol):
    """What the channel hands over: an arena, or sealed bytes."""

    def export(self) -> int:
        """A new descriptor that the receiver may read and not write; the caller closes it."""
        ...


class SealedBytes:
    """Bytes in a memfd sealed against every change, handed to clients as a descriptor instead of in a gRPC
    message. The memfd closes when this object goes."""

    def __init__(self, data: bytes, *, name: str) -> None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._finalizer = weakref.finalize(self, os.close, fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        self._fd = fd
        self.size = len(data)

    def export(self) -> int:
        return os.dup(self._fd)  # the seals make every descriptor of it read-only


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DescriptorChannel:
    """Serves the protocol above on ``path`` (created with ``mode``) from the running event loop.
    ``leased_descriptors`` gives what a live lease receives, in slot order, or None for no such lease."""

    def __init__(
        self,
        path: Path,
        *,
        mode: int,
        leased_descriptors: Callable[[str], Sequence[Exportable] | None],
        policy: PeerPolicy,
        metrics: Metrics,
    ) -> None:
        self.path = path
        self._metrics = metrics
        self._mode = mode
        self._leased_descriptors = leased_descriptors
        self._policy = policy
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, self._mode)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._spawn(self._accept_forever(listener))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(listener)
            self._spawn(self._serve(connection))

    async def _serve(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        descriptors: list[int] = []
        try:
            peer = _peer_of(connection)
            try:
                try:
                    request = await asyncio.wait_for(loop.sock_recv(connection, MAX_REQUEST_BYTES), REQUEST_TIMEOUT_S)
                except TimeoutError as e:
                    raise Refusal("DEADLINE_EXCEEDED", f"no lease id within {REQUEST_TIMEOUT_S} s") from e
                # Checked and exported in one step on the loop: the lease cannot end in between.
                for exportable in self._check(peer, _lease_id(request)):
                    descriptors.append(exportable.export())
                packets = _packets(descriptors)
            except Refusal as refusal:
                self._metrics.refused(refusal.code)
                logger.warning("descriptor channel: refused peer pid %d uid %d gid %d: %s",
                               peer.pid, peer.uid, peer.gid, refusal)
                packets = [(json.dumps({"error": str(refusal), "code": refusal.code}).encode(), [])]
            connection.settimeout(SEND_TIMEOUT_S)
        except BaseException as e:
            _close(connection, descriptors)
            if isinstance(e, OSError):
                logger.warning("descriptor channel: a peer went away: %s", e)
                return
            raise
        # The worker owns the connection and the descriptors from here on, even if this task is cancelled.
        await loop.run_in_executor(None, _send_and_close, connection, packets, descriptors)

    def _check(self, peer: Peer, lease_id: str) -> Sequence[Exportable]:
        if not self._policy.allows(peer):
            raise Refusal(
                "PERMISSION_DENIED",
                f"peer uid {peer.uid} gid {peer.gid} (pid {peer.pid}) may not receive arena descriptors; "
                f"allowed: {self._policy.describe()}",
            )
        exportables = self._leased_descriptors(lease_id)
        if exportables is None:
            raise Refusal(
                "NOT_FOUND",
                f"lease {lease_id!r} is not live (it ended, or never existed); attach again for a new lease",
            )
        return exportables


def _peer_of(connection: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid)


def _lease_id(request: bytes) -> str:
    try:
        lease_id = json.loads(request)["lease_id"]
    except (ValueError, KeyError, TypeError) as e:
        raise Refusal("INVALID_ARGUMENT", f'expected {{"lease_id": "..."}} as JSON, got {request[:80]!r}') from e
    if not isinstance(lease_id, str):
        raise Refusal("INVALID_ARGUMENT", f"lease_id must be a string, got {lease_id!r}")
    return lease_id


def _packets(descriptors: list[int]) -> list[tuple[bytes, list[int]]]:
    total = len(descriptors)
    return [
        (json.dumps({"total": total, "first_slot": first}).encode(),
         descriptors[first : first + MAX_DESCRIPTORS_PER_PACKET])
        for first in range(0, max(total, 1), MAX_DESCRIPTORS_PER_PACKET)
    ]


def _send_and_close(connection: socket.socket, packets: list[tuple[bytes, list[int]]], descriptors: list[int]) -> None:
    try:
        for payload, fds in packets:
            socket.send_fds(connection, [payload], fds)
    except OSError as e:
        logger.warning("descriptor channel: could not send to a peer: %s", e)
    finally:
        _close(connection, descriptors)


def _close(connection: socket.socket, descriptors: list[int]) -> None:
    for fd in descriptors:
        os.close(fd)
    connection.close()
