"""Fixtures of the codec tests (the page pairs themselves are in page_pairs.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import page_pairs


@pytest.fixture(scope="session")
def make_pair() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``make_pair(pattern, page_size, npages, seed)`` -> (cached, current)."""
    return page_pairs.make_pair


@pytest.fixture(scope="session")
def mixed_batch() -> tuple[np.ndarray, np.ndarray]:
    """12 pages of 4096 bytes, one per pattern (page_pairs.PATTERNS): every page kind shows up."""
    return page_pairs.mixed_batch()
