"""Fixtures shared by all tests. Markers are declared in pyproject.toml."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

SEED = 0


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the clone (the public datasets), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            "../shared/data is absent (a user's clone); these tests need the public datasets"
        )
    return SHARED_DATA


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed Python, numpy and torch before every test; returns the seed."""
    random.seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 - legacy global RNG, seeded for code that uses it
    try:
        import torch
    except ImportError:  # the Qt-free core imports torch lazily; tolerate its absence here
        pass
    else:
        torch.manual_seed(SEED)
    return SEED
