"""Settings: flags > WEIGHTD_* env > TOML file > default, and every variable documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from weightd.daemon.config import SETTINGS, DaemonConfig, parse_size
from weightd.daemon.errors import ConfigurationError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "weightd.toml"
    toml.write_text('socket = "/toml.sock"\nconcurrency = 4\nmemory_limit = "1GiB"\nlog_level = "debug"\n')
    env = {"WEIGHTD_CONCURRENCY": "8", "WEIGHTD_MEMORY_LIMIT": "256MiB"}
    config = DaemonConfig.load({"memory_limit": "64MiB"}, env, config_file=toml)
    assert config.socket == Path("/toml.sock")  # file
    assert config.concurrency == 8  # env beats file
    assert config.memory_limit == 64 * 2**20  # flag beats env
    assert config.log_level == "DEBUG"
    assert config.cache_dir == Path("/var/cache/weightd")  # default


def test_config_file_from_env_and_errors(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_parallel_loads = 3\n")
    assert DaemonConfig.load({}, {"WEIGHTD_CONFIG": str(toml)}).max_parallel_loads == 3
    toml.write_text("bogus = 1\n")
    with pytest.raises(ConfigurationError, match="unknown setting"):
        DaemonConfig.load({}, {}, config_file=toml)
    with pytest.raises(ConfigurationError, match="concurrency from WEIGHTD_CONCURRENCY"):
        DaemonConfig.load({}, {"WEIGHTD_CONCURRENCY": "many", "WEIGHTD_CONFIG": str(tmp_path / "absent.toml")})
    with pytest.raises(ConfigurationError, match="HOST:PORT"):
        DaemonConfig.load({"listen": "50051"}, {})
    with pytest.raises(ConfigurationError, match=r"distributed from WEIGHTD_DISTRIBUTED.*not a boolean"):
        DaemonConfig.load({}, {"WEIGHTD_DISTRIBUTED": "maybe"})
    assert DaemonConfig.load({}, {"WEIGHTD_DISTRIBUTED": "true"}).distributed is True


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_streamer_environment() -> None:
    config = DaemonConfig.load({"concurrency": "32"}, {})
    assert config.streamer_environment({}) == {
        "RUNAI_STREAMER_CONCURRENCY": "32", "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "30000"
    }
    assert "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS" not in config.streamer_environment(
        {"RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "5000"}
    )
    env = config.streamer_environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    # By default the streamer keeps its own per-backend concurrency (8 object-store clients, 16 file readers).
    assert "RUNAI_STREAMER_CONCURRENCY" not in DaemonConfig.load({}, {}).streamer_environment({})
    with pytest.raises(ConfigurationError, match=r"concurrency from flag: '-1': must be 0 or more"):
        DaemonConfig.load({"concurrency": "-1"}, {})
    with pytest.raises(ConfigurationError, match=r"^RUNAI_STREAMER_MEMORY_LIMIT, RUNAI_STREAMER_S3_MAX_INFLIGHT_MIB "
                                                 "are set but empty"):
        config.streamer_environment({"RUNAI_STREAMER_S3_MAX_INFLIGHT_MIB": "", "RUNAI_STREAMER_MEMORY_LIMIT": " "})


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in text, f"{setting.env} missing from README"
        assert f"`--{setting.name.replace('_', '-')}`" in text
    assert "`WEIGHTD_TARGET`" in text and "`WEIGHTD_CONFIG`" in text
