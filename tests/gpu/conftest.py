"""GPU tests: ``python -m pytest -m gpu tests/gpu`` on a machine with an NVIDIA GPU, CUDA-enabled torch and
``weightd[cuda12]`` or ``weightd[cuda13]``. Local-directory models only: no storage server, no network.

On a GPU machine without network access, carry the wheels weightd needs that its image lacks: build them
with scripts/gpu_wheels.sh where pip works; scripts/gpu_check.sh installs them there and runs these tests and
benchmarks/gpu.py.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
