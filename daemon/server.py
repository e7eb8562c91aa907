"""Build and run the grpc.aio servers: sockets, health, reflection, the descriptor channel, signals, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # grpc-stubs lacks aio
from grpc_reflection.v1alpha import reflection
from weightd.daemon.config import DaemonConfig
from weightd.daemon.descriptors import DescriptorChannel, PeerPolicy, descriptor_socket_path
from weightd.daemon.errors import ConfigurationError, MemoryUnavailableError
from weightd.daemon.gc_pause import when_no_load_runs
from weightd.daemon.loader import LoadSettings
from weightd.daemon.manifests import ManifestStore
from weightd.daemon.memory import open_backend, open_gpus
from weightd.daemon.memory.base import DeviceBackend
from weightd.daemon.memory.host import SMALL_PAGE_POLICIES, HugePagePool, huge_page_policy
from weightd.daemon.metrics import Metrics
from weightd.daemon.registry import Registry
from weightd.daemon.service import SERVICE_NAME, WeightService, add_weight_service, status_name
from weightd.daemon.storage.base import warm_up_storage

logger = logging.getLogger(__name__)

HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SOCKET_MODE = 0o660
# A grant lists every tensor: allow models with hundreds of thousands of them.
MAX_MESSAGE_BYTES = 256 * 2**20
SHUTDOWN_GRACE_S = 5.0


def arena_namespace(cache_dir: Path) -> str:
    """Names this daemon's arenas: the cache directory holds their manifests, so it is the daemon's identity."""
    return hashlib.sha256(str(cache_dir.resolve()).encode()).hexdigest()[:12]


async def serve(config: DaemonConfig) -> None:
    # The imports' objects (torch, gRPC: about 190k, none of them garbage) are exempt from garbage collection
    # from here on: a full collection walking them took 86-140 ms holding the GIL. Done after READY, as it was,
    # it landed in a new daemon's first load.
    gc.freeze()
    loop = asyncio.get_running_loop()
    # Beside the start-up, so that a first load, which may come as soon as the daemon serves, finds its SDK ready.
    warming = loop.run_in_executor(None, warm_up_storage)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_cache_dir(config.cache_dir)
    memory = open_backend("host", directory=config.shm_dir, namespace=arena_namespace(config.cache_dir))
    settings = LoadSettings(memory_limit=config.memory_limit, distributed=config.distributed)
    capacity = memory.capacity()
    budget = config.host_memory_limit.of(capacity)
    gpus, gpus_unavailable = _open_gpus(config)
    metrics = Metrics(status_of=status_name)
    registry = Registry(
        memory,
        host_budget=budget,
        gpus=[(backend, config.gpu_memory_limit.of(backend.device.total_bytes)) for backend in gpus],
        gpus_unavailable=gpus_unavailable,
        keep_host_tier=config.host_tier == "keep",
        manifests=ManifestStore(config.cache_dir / "arenas"),
        cache_dir=config.cache_dir,
        settings=settings,
        max_parallel_loads=config.max_parallel_loads,
        metrics=metrics,
    )
    registry.adopt()
    channel_path = descriptor_socket_path(config.socket)
    leases_end = asyncio.Event()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    service = WeightService(
        registry,
        settings=settings,
        revalidate_after=config.revalidate_after,
        descriptor_socket=channel_path,
        shutdown=leases_end,
        metrics=metrics,
    )
    add_weight_service(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME], server)
    # Probes reach the daemon over TCP; the WeightService does not, unless the operator asks (--listen-api).
    probes = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, probes)
    reflection.enable_server_reflection([HEALTH_NAME, reflection.SERVICE_NAME], probes)

    metrics.watch(registry.gauges, asyncio.get_running_loop())
    metrics_server = metrics.serve(config.metrics_listen) if config.metrics_listen else None
    # TCP ports first: a taken port then stops the start before any socket file exists.
    if config.listen_api:
        _add_api_port(server, config)
    if config.listen:
        _bind(probes.add_insecure_port, config.listen, "--listen")
    _claim_socket(config.socket, socket.SOCK_STREAM)
    _claim_socket(channel_path, socket.SOCK_SEQPACKET)
    _bind(server.add_insecure_port, f"unix:{config.socket}", "--socket")
    channel = DescriptorChannel(
        channel_path,
        mode=SOCKET_MODE,
        leased_descriptors=service.leased_descriptors,
        policy=PeerPolicy(uids=config.allowed_uids, gids=config.allowed_gids),
        metrics=metrics,
    )
    await channel.start()
    await server.start()
    await probes.start()
    os.chmod(config.socket, SOCKET_MODE)
    for served in ("", SERVICE_NAME):
        await health.set(served, health_pb2.HealthCheckResponse.SERVING)
    where = ", ".join(
        [f"unix:{config.socket}"] + ([f"{config.listen_api} (API)"] if config.listen_api else [])
        + ([f"{config.listen} (health only)"] if config.listen else [])
        + ([f"http://{config.metrics_listen}/metrics"] if config.metrics_listen else [])
    )
    logger.info("weightd serving on %s (descriptors on %s, cache %s, arenas in %s, host memory budget %d bytes)",
                where, channel_path, config.cache_dir, config.shm_dir, budget)
    _warn_about_pages(config.shm_dir, capacity)
    _notify_systemd("READY=1")
    warming.add_done_callback(lambda _: when_no_load_runs(_freeze_start_up_heap))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    registry.stop_loading()  # first, so that requests waiting on a load are answered (UNAVAILABLE) at once
    keep = not config.free_on_stop
    logger.info("shutting down: stopping loads, ending leases and %s arenas",
                "keeping complete (for the next start)" if keep else "freeing")
    _notify_systemd("STOPPING=1")
    await health.enter_graceful_shutdown()
    leases_end.set()
    await asyncio.gather(server.stop(SHUTDOWN_GRACE_S), probes.stop(SHUTDOWN_GRACE_S))
    await channel.close()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    await registry.close(keep_arenas=keep, timeout=SHUTDOWN_GRACE_S)
    await warming
    with contextlib.suppress(FileNotFoundError):
        config.socket.unlink()
    lock.close()


def _open_gpus(config: DaemonConfig) -> tuple[list[DeviceBackend], str]:
    """The node's GPUs as --memory asks, and, when there are none, why (clients asking for one are told)."""
    if config.memory == "host":
        return [], "it was started with --memory host"
    try:
        backends = open_gpus(sharing=config.cuda_ipc)
    except MemoryUnavailableError as e:
        if config.memory == "cuda":
            raise MemoryUnavailableError(f"--memory cuda: {e}") from e
        logger.info("serving host memory only: %s", e)
        return [], str(e)
    for device in (backend.device for backend in backends):
        logger.info("GPU %d: %s (%s, %.1f GiB; weights budget %.1f GiB, shared by %s)", device.ordinal, device.uuid,
                    device.name, device.total_bytes / 2**30, config.gpu_memory_limit.of(device.total_bytes) / 2**30,
                    "read-only VMM descriptors" if config.cuda_ipc == "vmm" else "legacy CUDA IPC handles")
    return backends, ""


def _add_api_port(server: grpc.aio.Server, config: DaemonConfig) -> None:
    if not config.tls_cert:
        _bind(server.add_insecure_port, config.listen_api, "--listen-api")  # loopback only (DaemonConfig)
        return
    try:
        key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as e:
        raise ConfigurationError(f"cannot read TLS material for --listen-api: {e}") from e
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    _bind(lambda address: server.add_secure_port(address, credentials), config.listen_api, "--listen-api")


def _bind(add_port: Callable[[str], int], address: str, flag: str) -> None:
    try:
        add_port(address)
    except RuntimeError as e:  # how grpc reports an address it cannot bind
        raise ConfigurationError(f"cannot listen on {address} ({e}); free it or choose another {flag}") from e


def _lock_cache_dir(cache_dir: Path) -> IO[str]:
    """One daemon per cache directory: it owns the arenas its manifests record. Held until the process ends."""
    lock = open(cache_dir / "weightd.lock", "a+")  # held for the daemon's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.close()
        raise ConfigurationError(
            f"another weightd daemon is using cache directory {cache_dir}; stop it, or give this one its own "
            "--cache-dir"
        ) from e
    return lock


def _claim_socket(path: Path, kind: socket.SocketKind) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal one a live daemon is serving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ConfigurationError(f"another process is serving on {path}; stop it or choose another --socket")


def _warn_about_pages(shm_dir: Path, capacity: int) -> None:
    """Warn when arenas would be filled one 4 KiB page at a time, or would find no page at all."""
    if HugePagePool.of(shm_dir) is not None:
        if capacity == 0:
            logger.warning("arenas in %s take huge pages from the kernel's pool, which holds none of that size: "
                           "every load fails until some are reserved (vm.nr_hugepages) and the daemon is "
                           "restarted (README, 'Huge pages for arenas')", shm_dir)
        return
    policy = huge_page_policy(shm_dir)
    if policy in SMALL_PAGE_POLICIES:
        # Measured here: 0.6-0.7 s of CPU per GB to reserve and fault 4 KiB pages, 0.06 s with 2 MiB pages.
        logger.warning("arenas in %s get 4 KiB pages (tmpfs huge=%s), which cost a cold load about 0.6 s of CPU "
                       "per GB more than huge pages; give the daemon a tmpfs mounted with huge=within_size "
                       "(README, 'Huge pages for arenas')", shm_dir, policy)


def _freeze_start_up_heap() -> None:
    """Exempt the storage warm-up's objects (botocore's S3 model: about 30k) from garbage collection too, as the
    imports' already are. Each full collection walked them all: 140-180 ms holding the GIL on a busy 2-core
    node with the imports' objects, landing in the middle of loads and attaches every few loads. After the
    freeze a full collection takes 0.1-6 ms. Not while a load runs (a first load that came before the warm-up
    ended): the collection would walk its objects mid-load and the freeze keep its cyclic garbage for good.
    After such a load the resident model's entry is frozen with the start-up heap: it lives as long as the
    model and leaves no cycles when evicted (tests/test_gc_pause.py)."""
    gc.collect()  # garbage of the warm-up is freed, not kept for good: 7 ms over the objects not yet frozen
    gc.freeze()
    logger.debug("start-up heap frozen: %d objects exempt from garbage collection", gc.get_freeze_count())


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
