"""Shared fixtures. Real data lives in ../shared/data beside the project; tests that need it skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it sits beside the project in development and CI)")
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("hippocampus")`` -> Path, skipping when ../shared/data is absent."""
    return shared_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine's cores are shared: one torch thread avoids spin-wait contention (up to 40x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def benchmark_module(name: str):
    """Import ``benchmarks/NAME.py`` (not a package) so that tests can check what the benchmarks measure."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module          # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]
