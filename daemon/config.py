"""Every daemon setting in one frozen object. Precedence: command-line flag > WEIGHTD_* env > TOML file > default.

The README's settings table is generated from ``SETTINGS`` (tests/test_config.py keeps them in step).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from weightd.daemon.errors import InvalidRequestError

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


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"listen address {value!r} must be HOST:PORT, e.g. 127.0.0.1:50051")
    return value


def _boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean; use true or false")


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str

    @property
    def env(self) -> str:
        return f"WEIGHTD_{self.name.upper()}"


SETTINGS: tuple[Setting, ...] = (
    Setting("socket", Path("/run/weightd/weightd.sock"), Path, "Unix socket to serve on (created mode 0660)."),
    Setting("listen", "", _listen, "Optional TCP HOST:PORT too (for gRPC health probes); loopback unless you say."),
    Setting("cache_dir", Path("/var/cache/weightd"), Path, "Local cache of metadata files (config, tokenizer)."),
    Setting("shm_dir", Path("/dev/shm"), Path, "tmpfs directory holding host shared-memory arenas."),
    Setting("concurrency", 16, int, "Storage clients (threads) per load (RUNAI_STREAMER_CONCURRENCY)."),
    Setting("memory_limit", 512 * 2**20, parse_size, "Staging buffer per load for slices that scatter, e.g. 512MiB."),
    Setting("max_parallel_loads", 2, int, "Model loads that may run at once."),
    Setting("revalidate_after", 30.0, float, "Seconds before an attach re-checks a resident model in storage."),
    Setting("distributed", False, _boolean, "Streamer distributed mode (needs CUDA; off without it)."),
    Setting("log_level", "INFO", str.upper, "Python log level."),
)


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path
    listen: str
    cache_dir: Path
    shm_dir: Path
    concurrency: int
    memory_limit: int
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
                raise InvalidRequestError(f"config file {path}: {e}") from e
            unknown = set(file_values) - {s.name for s in SETTINGS}
            if unknown:
                raise InvalidRequestError(f"config file {path}: unknown setting(s) {', '.join(sorted(unknown))}")
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
                        raise InvalidRequestError(f"{setting.name} from {source}: {value!r}: {e}") from e
                    break
            else:
                values[setting.name] = setting.default
        return cls(**values)

    def streamer_environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """runai-model-streamer settings, read process-wide when a streamer starts; the entry point applies them."""
        settings = {"RUNAI_STREAMER_CONCURRENCY": str(self.concurrency)}
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

