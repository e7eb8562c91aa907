"""Build and run the grpc.aio server: sockets, health, reflection, signals, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # grpc-stubs lacks aio
from grpc_reflection.v1alpha import reflection
from weightd.daemon.config import DaemonConfig
from weightd.daemon.errors import InvalidRequestError
from weightd.daemon.memory.host import HostMemory
from weightd.daemon.registry import LoadSettings, Registry
from weightd.daemon.service import WeightService
from weightd.v1 import weightd_pb2, weightd_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = weightd_pb2.DESCRIPTOR.services_by_name["WeightService"].full_name
SOCKET_MODE = 0o660
# A grant lists every tensor: allow models with hundreds of thousands of them.
MAX_MESSAGE_BYTES = 256 * 2**20
SHUTDOWN_GRACE_S = 5.0


async def serve(config: DaemonConfig) -> None:
    memory = HostMemory(config.shm_dir)
    memory.remove_stale()
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    settings = LoadSettings(memory_limit=config.memory_limit, distributed=config.distributed)
    registry = Registry(
        memory, cache_dir=config.cache_dir, settings=settings, max_parallel_loads=config.max_parallel_loads
    )
    leases_end = asyncio.Event()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    weightd_pb2_grpc.add_WeightServiceServicer_to_server(
        WeightService(registry, settings=settings, revalidate_after=config.revalidate_after, shutdown=leases_end),
        server,
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )

    _claim_socket(config.socket)
    server.add_insecure_port(f"unix:{config.socket}")
    if config.listen:
        server.add_insecure_port(config.listen)
    await server.start()
    os.chmod(config.socket, SOCKET_MODE)
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    where = f"unix:{config.socket}" + (f" and {config.listen}" if config.listen else "")
    logger.info("weightd serving on %s (cache %s, arenas in %s)", where, config.cache_dir, config.shm_dir)
    _notify_systemd("READY=1")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    logger.info("shutting down: ending leases and freeing arenas")
    _notify_systemd("STOPPING=1")
    await health.enter_graceful_shutdown()
    leases_end.set()
    await server.stop(SHUTDOWN_GRACE_S)
    await registry.close()
    with contextlib.suppress(FileNotFoundError):
        config.socket.unlink()


def _claim_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal one a live daemon is serving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise InvalidRequestError(f"another process is serving on {path}; stop it or choose another --socket")


def _notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET ('@' = abstract namespace)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
