"""Lint and type checks run with the suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff() -> None:
    result = subprocess.run([str(BIN / "ruff"), "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy(tmp_path: Path) -> None:
    # mypy cannot follow setuptools' editable finder for package-dir mappings: give it the installed layout.
    package = tmp_path / "weightd"
    package.mkdir()
    for name, source in (("daemon", "daemon"), ("client", "client"), ("integrations", "integrations"),
                         ("v1", "proto/weightd/v1")):
        (package / name).symlink_to(ROOT / source)
    result = subprocess.run(
        [str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
         "-p", "weightd.daemon", "-p", "weightd.client", "-p", "weightd.integrations", "-p", "weightd.v1"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
