"""``Encoded``: a batch of page encodings as one payload plus per-page offsets and kinds."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Encoded:
    """Output of a codec's ``encode`` and input of its ``decode``.

    Page i's encoding is ``raw[offsets[i]:offsets[i+1]]`` where ``raw`` is
    ``payload`` after undoing the chain's entropy coder (``payload`` itself
    when the chain has none). ``kinds`` holds ``pipeline.batch.PageKind``
    values; ``raw_size`` is ``len(raw)``.
    """

    payload: np.ndarray   # 1-D uint8
    offsets: np.ndarray   # uint64 (uint32 accepted), n + 1, non-decreasing from 0
    kinds: np.ndarray     # uint8, n
    codec: str            # canonical chain name, e.g. "native+zstd"
    raw_size: int
