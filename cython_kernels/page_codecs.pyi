"""Batch kernels of the page run formats (compiled; see page_codecs.pyx). Call them through ``stages.codecs``."""
import numpy as np

NATIVE: int
XBZRLE: int
XEN: int
KINDS: dict[str, int]
REASONS: tuple[str, ...]

def max_page_bytes(fmt: int, page_size: int) -> int:
    """Payload room one page's encoding may need in format ``fmt``."""

def payload_capacity(fmt: int, npages: int, page_size: int) -> int:
    """Payload buffer encode_pages needs for ``npages`` pages (largest encodings plus copy slack)."""

def encode_pages(fmt: int, current: np.ndarray, cached: np.ndarray, slots: np.ndarray, payload: np.ndarray,
                 offsets: np.ndarray, kinds: np.ndarray, emit_zero: bool) -> int:
    """Encode current[i] against cached[slots[i]] (updated in place); fill offsets and kinds.

    Returns the payload length, or -1 if ``payload`` is too small or a slot is out of range.
    """

def walk_payload(fmt: int, payload: np.ndarray, offsets: np.ndarray, kinds: np.ndarray, replica: np.ndarray,
                 rows: np.ndarray, apply: bool, where: np.ndarray) -> int:
    """Check (``apply``: also write onto replica[rows[i]]) every page of a payload.

    Returns -1 if valid, else the first bad page index with where = [payload offset, reason code].
    """

def digest_decoded(fmt: int, payload: np.ndarray, offsets: np.ndarray, kinds: np.ndarray, previous: np.ndarray,
                   rows: np.ndarray, scratch: np.ndarray, digests: np.ndarray, where: np.ndarray) -> int:
    """digests[i] = XXH64 (seed 0) of the page the payload makes from previous[rows[i]] (row -1: zeros).

    Writes nothing but ``digests`` and ``scratch`` (one page). Returns -1 if valid, else the first bad
    page index with where = [payload offset, reason code]; ValueError if the buffers do not fit together.
    """
