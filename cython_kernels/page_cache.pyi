"""Batch kernels of xor-delta (compiled; see page_cache.pyx). Call them through ``stages.xor_delta``."""
import numpy as np

FORMATS: dict[str, int]

def payload_capacity(fmt: int, deltas: int, whole: int, page_size: int) -> int:
    """Payload buffer encode_batch needs for ``deltas`` pages to encode and ``whole`` pages to copy."""

def encode_batch(fmt: int, pages: np.ndarray, kinds: np.ndarray, slots: np.ndarray, cache: np.ndarray,
                 payload: np.ndarray, offsets: np.ndarray, out_kinds: np.ndarray, order: np.ndarray,
                 emit_zero: bool) -> int:
    """Encode a planned batch against the cache in one pass (DELTA rows encoded against cache[slots[i]], FULL/RAW
    rows copied whole and cached, ZERO rows zero their slot); entries ordered encoded, whole, zero.

    Fills offsets (n + 1), out_kinds (n) and order (n, source rows); returns the payload length, or -1 if the
    arrays disagree, a slot is out of range, the payload is too small or a kind is not DELTA/FULL/RAW/ZERO.
    """

def plan_lookup(pages: np.ndarray, numbers: np.ndarray, kinds_in: np.ndarray, index: np.ndarray,
                last_used: np.ndarray, clock: int, find_zero: bool, kinds: np.ndarray, slots: np.ndarray) -> int:
    """Per page: its slot in the dense index (int32, -1 = not cached; -1 past its end), stamped ``clock`` in
    last_used, and its outgoing kind (ZERO if it came ZERO or, ``find_zero``, is all zeros; else DELTA if cached,
    FULL if not).

    Returns how many pages have no slot; -1 if a page is not NORMAL/ZERO or the arrays disagree (nothing to
    trust: plan the general way), -2 if a cached page's number appears twice.
    """
