"""The daemon's Prometheus metrics: counters and histograms updated where things happen (registry, service,
descriptor channel), and gauges read from the registry on the event loop when scraped. Served over HTTP on
``--metrics-listen`` (off by default) from a thread of prometheus-client's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from weightd.daemon.errors import ConfigurationError

logger = logging.getLogger(__name__)

# Seconds. Loads run from a fraction of a second (local, small) to many minutes (hundreds of GB).
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
# A warm attach takes milliseconds; one that waits for a cold load takes as long as the load.
ATTACH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1200)
# How long a scrape waits for the event loop to read the registry.
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class MemoryGauge:
    """One memory's figures at scrape time: ``device`` is a GPU's UUID, or "host"."""

    memory_kind: str
    device: str
    resident_bytes: int
    budget_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class Gauges:
    leases: int
    memories: list[MemoryGauge]


class Metrics:
    """Every metric of one daemon, in a registry of its own (not prometheus-client's global one)."""

    def __init__(self, *, status_of: Callable[[BaseException], str]) -> None:
        """``status_of`` names a failed load's error as clients see it (its gRPC status)."""
        self.registry = CollectorRegistry()
        self._status_of = status_of
        self._loads_started = Counter(
            "weightd_loads_started", "Model loads started: from storage, or a GPU copy of the host tier.",
            registry=self.registry,
        )
        self._loads_succeeded = Counter("weightd_loads_succeeded", "Model loads that completed.",
                                        registry=self.registry)
        self._loads_failed = Counter("weightd_loads_failed", "Model loads that failed, by the gRPC status "
                                     "their waiters got.", ["status"], registry=self.registry)
        self._storage_bytes = Counter("weightd_storage_read_bytes", "Weight bytes read from storage for the "
                                      "loaded tensors, by URI scheme (file, s3, gs, az); the gaps between small "
                                      "reads joined into one (object stores) are read too, uncounted.",
                                      ["scheme"], registry=self.registry)
        self._load_seconds = Histogram("weightd_load_duration_seconds", "Time from a load's start to its end, "
                                       "failed loads included.", buckets=LOAD_BUCKETS, registry=self.registry)
        self._attach_seconds = Histogram("weightd_attach_duration_seconds", "Time from an AttachModel request to "
                                         "its grant (a cold load included).", buckets=ATTACH_BUCKETS,
                                         registry=self.registry)
        self._evictions = Counter("weightd_evictions", "Entries freed: by an EvictModel request, to make room "
                                  "within a budget, or replaced by a newer revision.", ["reason"],
                                  registry=self.registry)
        self._refusals = Counter("weightd_descriptor_refusals", "Descriptor-channel requests refused, by the code "
                                 "the peer was sent.", ["code"], registry=self.registry)

    def load_started(self) -> None:
        self._loads_started.inc()

    def load_finished(self, *, seconds: float, scheme: str, storage_bytes: int, error: BaseException | None) -> None:
        self._load_seconds.observe(seconds)
        self._storage_bytes.labels(scheme).inc(storage_bytes)
        if error is None:
            self._loads_succeeded.inc()
        else:
            self._loads_failed.labels(self._status_of(error)).inc()

    def attached(self, seconds: float) -> None:
        self._attach_seconds.observe(seconds)

    def evicted(self, reason: str, count: int = 1) -> None:
        self._evictions.labels(reason).inc(count)

    def refused(self, code: str) -> None:
        self._refusals.labels(code).inc()

    def watch(self, read: Callable[[], Gauges], loop: asyncio.AbstractEventLoop) -> None:
        """Report the gauges ``read`` returns, calling it on ``loop`` (which owns the registry) at each scrape."""
        self.registry.register(_GaugeCollector(read, loop))

    def serve(self, address: str) -> WSGIServer:
        """Serve ``/metrics`` on ``address`` (HOST:PORT) from a background thread; shut it down when done."""
        host, _, port = address.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as e:
            raise ConfigurationError(
                f"cannot serve metrics on {address} ({e.strerror or e}); free the port or choose another "
                "--metrics-listen"
            ) from e
        return server


class _GaugeCollector(Collector):
    def __init__(self, read: Callable[[], Gauges], loop: asyncio.AbstractEventLoop) -> None:
        self._read = read
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        async def read_on_loop() -> Gauges:
            return self._read()

        future = asyncio.run_coroutine_threadsafe(read_on_loop(), self._loop)
        try:
            gauges = future.result(timeout=SCRAPE_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            logger.warning("metrics: the event loop did not answer within %s s; gauges left out", SCRAPE_TIMEOUT_S)
            return
        yield GaugeMetricFamily("weightd_leases", "Live leases (attached clients' ranks).", value=gauges.leases)
        labels = ["memory_kind", "device"]
        resident = GaugeMetricFamily("weightd_resident_bytes", "Bytes of arenas holding ready models.",
                                     labels=labels)
        budget = GaugeMetricFamily("weightd_budget_bytes", "The memory's budget for weights.", labels=labels)
        used = GaugeMetricFamily("weightd_budget_used_bytes", "Bytes of the budget held: ready arenas and "
                                 "reservations of loads in progress.", labels=labels)
        for memory in gauges.memories:
            values = [memory.memory_kind, memory.device]
            resident.add_metric(values, memory.resident_bytes)
            budget.add_metric(values, memory.budget_bytes)
            used.add_metric(values, memory.used_bytes)
        yield from (resident, budget, used)
