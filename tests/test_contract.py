"""The wire contract and the public surface: generated code is current, names are pinned."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import weightd.client
from weightd.v1 import weightd_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("weightd_pb2.py", "weightd_pb2.pyi", "weightd_pb2_grpc.py")


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_proto.py"), str(tmp_path)], check=True)
    for name in GENERATED:
        fresh = (tmp_path / "weightd" / "v1" / name).read_text()
        committed = (ROOT / "proto" / "weightd" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run python scripts/generate_proto.py"


def test_stubs_import_as_weightd_v1() -> None:
    source = (ROOT / "proto" / "weightd" / "v1" / "weightd_pb2_grpc.py").read_text()
    assert "from weightd.v1 import weightd_pb2" in source


def test_enums_have_unspecified_zero() -> None:
    for enum in weightd_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name == f"{_upper_snake(enum.name)}_UNSPECIFIED"


def _upper_snake(name: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


def test_client_public_surface_is_pinned() -> None:
    assert weightd.client.__all__ == [
        "AccessDeniedError",
        "AttachedModel",
        "CorruptModelError",
        "DeadlineExceededError",
        "Fusion",
        "InvalidRequestError",
        "LoadProgress",
        "MemoryBudget",
        "ModelMetadata",
        "ModelNotFoundError",
        "PreconditionFailedError",
        "ResidentModel",
        "ResourceExhaustedError",
        "ShardRule",
        "UnavailableError",
        "WeightdError",
        "attach",
        "evict",
        "fetch_metadata",
        "list_models",
        "load",
        "memory_budgets",
    ]
    for name in weightd.client.__all__:
        assert getattr(weightd.client, name).__module__.startswith("weightd.client")


def test_client_and_integrations_never_import_the_daemon() -> None:
    for path in [*(ROOT / "client").glob("*.py"), *(ROOT / "integrations").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("weightd.daemon") for n in names), f"{path.name} imports the daemon"


def test_storage_memory_and_loading_never_import_grpc() -> None:
    daemon = ROOT / "daemon"
    domain = ("loader", "source", "streaming", "stream_helper", "manifests", "registry", "descriptors", "plan")
    for path in [*(daemon / "storage").glob("*.py"), *(daemon / "memory").glob("*.py"),
                 *(daemon / f"{name}.py" for name in domain)]:
        source = path.read_text()
        assert "import grpc" not in source and "from grpc" not in source, path


def test_no_top_level_daemon_or_client_packages(tmp_path: Path) -> None:
    # Outside the checkout (pytest puts the repository root on sys.path), only weightd.* is importable.
    probe = "import importlib.util as u; print([n for n in ('daemon', 'client') if u.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
