"""Shared fixtures: the real data under ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Tests compare bytes across code paths: they pin the reference engine unless they set one themselves.
# The measured choice ("auto", what `make serve` and batch encoding use) has its own tests.
os.environ.setdefault("VQDIFF_ENGINE", "torch-fp32")


def shared_data_dir() -> Path:
    env = os.environ.get("VQDIFF_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


SUBJECT = shared_data_dir() / "subject01"
needs_data = pytest.mark.skipif(
    not SUBJECT.is_dir(), reason=f"real data not found at {SUBJECT} (set VQDIFF_SHARED_DATA to ../shared/data)"
)


@pytest.fixture(scope="session")
def subject_dir() -> Path:
    if not SUBJECT.is_dir():
        pytest.skip(f"real data not found at {SUBJECT} (set VQDIFF_SHARED_DATA to ../shared/data)")
    return SUBJECT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads():
    """Every test starts with the same torch thread count (engines opened with ``threads=`` change it
    process-wide, and convolutions round differently with another count: byte-identity tests see it)."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
