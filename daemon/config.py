"""Every daemon setting in one frozen object. Precedence: command-line flag > WEIGHTD_* env > TOML file > default.

The README's settings table is generated from ``SETTINGS`` (tests/test_config.py keeps them in step).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from weightd.daemon.errors import ConfigurationError

DEFAULT_CONFIG_FILE = Path("/etc/weightd/weightd.toml")
S3_REQUEST_TIMEOUT_MS = 30_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes from ``536870912``, ``512MiB``, ``1.5G`` (decimal units) or ``2GiB`` (binary)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; use bytes or a unit such as 512MiB or 2G")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _non_negative_int(value: str | int) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"listen address {value!r} must be HOST:PORT, e.g. 127.0.0.1:50051")
    return value


@dataclass(frozen=True)
class MemoryLimit:
    """Bytes, or a share of the memory's capacity (``"75%"``)."""

    bytes: int | None = None
    fraction: float | None = None

    def of(self, capacity: int) -> int:
        return self.bytes if self.bytes is not None else int(capacity * (self.fraction or 0.0))

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else str(self.bytes)


def parse_memory_limit(value: str | int) -> MemoryLimit:
    if isinstance(value, str) and value.strip().endswith("%"):
        percent = float(value.strip()[:-1])
        if not 0 < percent <= 100:
            raise ValueError(f"{value!r}: a percentage must be in (0, 100]")
        return MemoryLimit(fraction=percent / 100)
    return MemoryLimit(bytes=parse_size(value))


def _ids(value: str | int | list[int]) -> frozenset[int]:
    """``"0,1000"`` (or a TOML list) -> {0, 1000}."""
    if isinstance(value, int):
        return frozenset({value})
    items = value if isinstance(value, list) else [v for v in value.split(",") if v.strip()]
    return frozenset(int(v) for v in items)


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean; use true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.lower()

    return parse


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str

    @property
    def env(self) -> str:
        return f"WEIGHTD_{self.name.upper()}"


# --memory-limit's default; what weightd.daemon.streaming keeps of a staging buffer between loads.
DEFAULT_STAGING_BYTES = 64 << 20

SETTINGS: tuple[Setting, ...] = (
    Setting("socket", Path("/run/weightd/weightd.sock"), Path, "Unix socket to serve on (created mode 0660)."),
    Setting("listen", "", _listen, "TCP HOST:PORT serving only health and reflection (for Kubernetes gRPC probes)."),
    Setting("listen_api", "", _listen,
            "TCP HOST:PORT serving the WeightService too; loopback only unless --tls-cert and --tls-key are set."),
    Setting("metrics_listen", "", _listen, "HOST:PORT serving Prometheus metrics at /metrics over HTTP (off "
            "when empty)."),
    Setting("tls_cert", "", str, "PEM certificate chain for --listen-api."),
    Setting("tls_key", "", str, "PEM private key for --listen-api."),
    Setting("tls_client_ca", "", str, "PEM CA bundle: --listen-api then requires client certificates it signed."),
    Setting("cache_dir", Path("/var/cache/weightd"), Path, "Local cache of metadata files (config, tokenizer)."),
    Setting("shm_dir", Path("/dev/shm"), Path, "tmpfs or hugetlbfs directory holding host shared-memory arenas."),
    Setting("concurrency", 0, _non_negative_int,
            "Storage clients (threads) per load (RUNAI_STREAMER_CONCURRENCY); 0: the streamer's own default, "
            "8 for object storage and 16 for file systems."),
    # Small, as a load holds it beside its arenas (and the daemon keeps one between loads); double buffering keeps
    # the streamer busy.
    Setting("memory_limit", DEFAULT_STAGING_BYTES, parse_size,
            "Staging buffer per load for slices that scatter, e.g. 64MiB."),
    Setting("host_memory_limit", MemoryLimit(fraction=0.75), parse_memory_limit,
            "Budget for host arenas: bytes (64GiB) or a share of --shm-dir's size (75%)."),
    Setting("memory", "auto", _choice("auto", "host", "cuda"),
            "Where weights live: cuda (the node's GPUs, and host memory for clients without one), host, or auto "
            "(cuda when the daemon finds GPUs and the weightd[cuda12]/[cuda13] extra, else host)."),
    Setting("cuda_ipc", "vmm", _choice("vmm", "legacy"),
            "How GPU memory is shared: vmm (read-only VMM descriptors) or legacy (cudaIpcMemHandle: writable by "
            "clients, needs a shared PID namespace)."),
    Setting("gpu_memory_limit", MemoryLimit(fraction=0.4), parse_memory_limit,
            "Budget for weights on each GPU: bytes or a share of the GPU's memory (40%; the rest is the engines')."),
    Setting("host_tier", "keep", _choice("keep", "drop"),
            "After a GPU load, keep its host copy (within --host-memory-limit) so evictions and restarts refill "
            "the GPU with no storage reads, or drop it."),
    Setting("free_on_stop", False, _boolean,
            "Free every arena when the daemon stops; by default they stay for the next start to adopt."),
    Setting("allowed_uids", frozenset(), _ids, "Peer uids that may receive arena descriptors (empty: anyone who can "
            "open the socket, unless --allowed-gids is set)."),
    Setting("allowed_gids", frozenset(), _ids, "Peer primary gids that may receive arena descriptors."),
    Setting("max_parallel_loads", 2, int, "Model loads that may run at once."),
    Setting("revalidate_after", 30.0, float, "Seconds before an attach re-checks a resident model in storage."),
    Setting("distributed", False, _boolean, "Streamer distributed mode (needs CUDA; off without it)."),
    Setting("log_level", "INFO", str.upper, "Python log level."),
)


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path
    listen: str
    listen_api: str
    metrics_listen: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    cache_dir: Path
    shm_dir: Path
    concurrency: int
    memory_limit: int
    host_memory_limit: MemoryLimit
    memory: str
    cuda_ipc: str
    gpu_memory_limit: MemoryLimit
    host_tier: str
    free_on_stop: bool
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    max_parallel_loads: int
    revalidate_after: float
    distributed: bool
    log_level: str

    @classmethod
    def load(
        cls, flags: Mapping[str, Any], env: Mapping[str, str], *, config_file: Path | None = None
    ) -> DaemonConfig:
        """``flags`` holds only the flags the user gave (None means not given)."""
        path = config_file or Path(env.get("WEIGHTD_CONFIG", DEFAULT_CONFIG_FILE))
        file_values: dict[str, Any] = {}
        if config_file is not None or path.exists():
            try:
                file_values = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigurationError(f"config file {path}: {e}") from e
            unknown = set(file_values) - {s.name for s in SETTINGS}
            if unknown:
                raise ConfigurationError(f"config file {path}: unknown setting(s) {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            for source, value in (
                ("flag", flags.get(setting.name)),
                (setting.env, env.get(setting.env)),
                (str(path), file_values.get(setting.name)),
            ):
                if value is not None:
                    try:
                        values[setting.name] = setting.parse(value)
                    except (ValueError, TypeError) as e:
                        raise ConfigurationError(f"{setting.name} from {source}: {value!r}: {e}") from e
                    break
            else:
                values[setting.name] = setting.default
        config = cls(**values)
        config._check()
        return config

    def _check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.listen_api and not self.tls_cert and not is_loopback(self.listen_api):
            raise ConfigurationError(
                f"--listen-api {self.listen_api} is not a loopback address: serving the WeightService beyond this "
                "node lets anyone who reaches the port load any URI with the node's credentials. Use "
                "127.0.0.1:PORT, or pass --tls-cert and --tls-key (and --tls-client-ca to require client certificates)"
            )

    def streamer_environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """runai-model-streamer settings, read process-wide when a streamer starts; the entry point applies them.
        ConfigurationError for a streamer variable set to nothing, which would fail every load."""
        empty = sorted(name for name, value in env.items() if name.startswith("RUNAI_STREAMER_") and not value.strip())
        if empty:
            # runai-model-streamer 0.17 fails on them at each load: "Invalid request parameters" (concurrency,
            # chunk size, queue depth), int('') (memory limit), "Unknown Error" for every range (S3 in-flight).
            raise ConfigurationError(
                f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} set but empty, which fails every load in "
                "runai-model-streamer; unset or give a value"
            )
        # 0 leaves the streamer's per-backend default: 16 object-store clients on 2 cores took 2.5x as long
        # as its 8 for a 5 GB model (docs/benchmarks.md).
        settings = {"RUNAI_STREAMER_CONCURRENCY": str(self.concurrency)} if self.concurrency else {}
        if "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS" not in env:
            # The streamer's 1 s default fails loaded or cross-region endpoints with "File access error".
            settings["RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS"] = str(S3_REQUEST_TIMEOUT_MS)
        if (env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")) and (
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING" not in env
        ):
            # S3-compatible endpoints are addressed by host name or IP: path-style requests.
            settings["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "0"
        if env.get("STORAGE_EMULATOR_HOST") and "CLOUD_STORAGE_EMULATOR_ENDPOINT" not in env:
            # The GCS SDK's emulator variable; the streamer only reads its own.
            settings["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = env["STORAGE_EMULATOR_HOST"]
        return settings

