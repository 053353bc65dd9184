"""Batch kernels over whole pages (compiled; see pages.pyx). Call them through ``stages.common.pages``."""
import numpy as np

def find_zero_pages(pages: np.ndarray, out: np.ndarray) -> None:
    """out[i] (uint8) = 1 if pages[i] (uint8, C-contiguous rows of a multiple of 64 bytes) is all zeros."""

def digest_pages(pages: np.ndarray, out: np.ndarray) -> None:
    """out[i] (uint64) = XXH64, seed 0, of pages[i] (row length a multiple of 32 bytes)."""
