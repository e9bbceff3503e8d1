"""Shared test fixtures: the real datasets beside the repo, skipped cleanly when absent."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (the CLI does the same): on a loaded 2-core
# machine spinning made the torch tests 3-6x slower. Set before any test imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("EDGESEG_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} not found at {path} (set EDGESEG_SHARED_DATA)")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA
