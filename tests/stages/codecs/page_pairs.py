"""Page pairs for the codec tests: (cached, current) batches in the patterns real memory shows."""
from __future__ import annotations

import numpy as np

PATTERNS = ("unchanged", "one_byte", "first_and_last", "sparse_words", "dense", "alternating", "all_changed",
            "zero_pages", "became_zero", "from_zero", "runs_near_gaps", "counter")


def make_pair(pattern: str, page_size: int, npages: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``npages`` (cached, current) pairs of one pattern; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    cached = rng.integers(0, 256, size=(npages, page_size), dtype=np.uint8)
    cached[:, rng.integers(0, page_size, size=page_size // 2)] = 0   # memory is mostly zero-ish
    current = cached.copy()
    for row in current:
        if pattern == "one_byte":
            row[rng.integers(page_size)] ^= rng.integers(1, 256, dtype=np.uint8)
        elif pattern == "first_and_last":
            row[[0, -1]] ^= 0xA5
        elif pattern == "sparse_words":
            words = row.view(np.uint64)
            picks = rng.integers(0, words.shape[0], size=rng.integers(1, 12))
            words[picks] += rng.integers(1, 1 << 40, size=picks.shape[0], dtype=np.uint64)
        elif pattern == "dense":
            mask = rng.random(page_size) < 0.6
            row[mask] ^= rng.integers(1, 256, size=int(mask.sum()), dtype=np.uint8)
        elif pattern == "alternating":
            row[::2] ^= 0xFF
        elif pattern == "all_changed":
            row ^= rng.integers(1, 256, size=page_size, dtype=np.uint8)
        elif pattern == "runs_near_gaps":
            for start in rng.integers(0, page_size - 16, size=20):
                gap = int(rng.integers(0, 5))
                row[start] ^= 1
                row[min(start + 1 + gap, page_size - 1)] ^= 2
        elif pattern == "counter":
            counter = rng.integers(0, page_size // 8) * 8
            row[counter] = (int(row[counter]) + 1) & 0xFF   # a byte counter wraps
    if pattern == "zero_pages":
        cached[:] = 0
        current[:] = 0
    elif pattern == "became_zero":
        current[:] = 0
    elif pattern == "from_zero":
        cached[:] = 0
        current[:, : page_size // 4] = rng.integers(1, 256, size=(npages, page_size // 4), dtype=np.uint8)
    return cached, current


def mixed_batch() -> tuple[np.ndarray, np.ndarray]:
    """12 pages of 4096 bytes, one per pattern: every page kind shows up."""
    pairs = [make_pair(pattern, 4096, 1, seed) for seed, pattern in enumerate(PATTERNS)]
    return np.concatenate([c for c, _ in pairs]), np.concatenate([p for _, p in pairs])
