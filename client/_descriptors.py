"""The client side of the daemon's descriptor channel: trade a lease id for the lease's arena descriptors.

Protocol (weightd.v1 Grant.descriptor_socket): one JSON packet ``{"lease_id": ...}`` on a Unix
SOCK_SEQPACKET socket; the daemon answers with ``{"total": N, "first_slot": i}`` packets carrying the
descriptors (SCM_RIGHTS) of slots i, i+1, ..., or with one ``{"error": ..., "code": ...}`` packet.
"""

from __future__ import annotations

import json
import os
import socket

import grpc
from weightd.client._errors import ResourceExhaustedError, UnavailableError, WeightdError, error_for

# The kernel's SCM_MAX_FD: no packet carries more.
MAX_DESCRIPTORS_PER_PACKET = 253
MAX_REPLY_BYTES = 64 * 1024


def receive_descriptors(path: str, lease_id: str, *, timeout: float = 30.0) -> list[int]:
    """The lease's descriptors, in slot order; the caller owns (and closes) them."""
    received: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                sock.send(json.dumps({"lease_id": lease_id}).encode())
            except OSError as e:
                raise UnavailableError(
                    f"cannot reach weightd's descriptor socket {path} ({e}); is the daemon running, and may "
                    "this process open that socket?",
                    code=grpc.StatusCode.UNAVAILABLE,
                ) from e
            while True:
                try:
                    payload, fds, flags, _ = socket.recv_fds(
                        sock, MAX_REPLY_BYTES, MAX_DESCRIPTORS_PER_PACKET, socket.MSG_CMSG_CLOEXEC
                    )
                except OSError as e:
                    raise UnavailableError(f"no descriptors from {path}: {e}", code=grpc.StatusCode.UNAVAILABLE) from e
                received.extend(fds)
                if flags & socket.MSG_CTRUNC:
                    raise ResourceExhaustedError(
                        f"descriptors from {path} were cut short: this process may not open more files "
                        "(raise its RLIMIT_NOFILE, ulimit -n)", code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
                if not payload:
                    raise UnavailableError(f"weightd closed {path} before sending every descriptor",
                                           code=grpc.StatusCode.UNAVAILABLE)
                try:
                    reply = json.loads(payload)
                except ValueError as e:
                    raise WeightdError(f"{path} sent something other than JSON: {payload[:80]!r}",
                                       code=grpc.StatusCode.INTERNAL) from e
                if "error" in reply:
                    raise error_for(str(reply.get("code", "UNKNOWN")), f"weightd refused the descriptors of lease "
                                    f"{lease_id}: {reply['error']}")
                if reply["first_slot"] != len(received) - len(fds):
                    raise WeightdError(f"descriptors from {path} arrived out of order", code=grpc.StatusCode.INTERNAL)
                if len(received) >= reply["total"]:
                    return received
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
