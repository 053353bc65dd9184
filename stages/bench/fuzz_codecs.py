"""The codec fuzzer: mutated payloads of every codec chain, decoded between guard pages, checked
against the reference decoders of ``stages.bench.fuzz_reference``.

For each case a valid batch is encoded from random pages (sparse edits, zero
pages, rewritten pages), then mutated: byte flips, inserted or deleted bytes,
changed offsets, kinds or raw size, or (for entropy chains) a mutated raw
payload compressed again, so the run-format decoder sees damage behind a valid
frame. The batch is decoded onto a replica whose rows sit between two
``PROT_NONE`` pages (a write outside the replica kills the process), and
digested with ``digest_decoded``. A *violation* is any of: an exception other
than CorruptData, a verdict (accept or reject) different from the reference
decoder's, accepted pages different from the reference's, a replica changed by
a rejected batch, or digests different from those of the reference's pages.
"""
from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field

import lz4.block
import numpy as np
import zstandard

from pipeline.errors import CorruptData
from stages.bench.fuzz_reference import reference_decode
from stages.codecs import ChainCodec, Encoded, get_chain_codec, get_page_codec, list_codecs, split_chain_name
from stages.common.pages import digest_pages

CHAINS = [name for name in list_codecs() if name.split("+")[0] in ("native", "xbzrle", "xen")]
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_GUARD = mmap.PAGESIZE
_PROT_NONE = 0


class GuardedRows:
    """``rows x page_size`` bytes of writable memory with an inaccessible page right before and after."""

    def __init__(self, rows: int, page_size: int):
        size = rows * page_size
        inner = -(-max(size, 1) // _GUARD) * _GUARD
        self._map = mmap.mmap(-1, inner + 2 * _GUARD)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        for at in (address, address + _GUARD + inner):
            if _LIBC.mprotect(at, _GUARD, _PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        start = _GUARD + inner - size           # the rows end exactly at the second guard page
        self.array = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=start).reshape(rows, page_size)


@dataclass
class CodecTally:
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    violations: list[str] = field(default_factory=list)

    def add(self, other: "CodecTally") -> None:
        self.cases += other.cases
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.violations += other.violations


def _random_batch(rng: np.random.Generator, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous, current) pages with the shapes real memory has: small edits, zeroed and rewritten pages."""
    npages = int(rng.integers(1, 7))
    previous = np.zeros((npages, page_size), dtype=np.uint8)
    previous[:, :page_size // 2] = rng.integers(0, 256, (npages, page_size // 2), dtype=np.uint8)
    current = previous.copy()
    for row in range(npages):
        style = int(rng.integers(0, 5))
        if style == 0:
            for _ in range(int(rng.integers(1, 6))):
                at = int(rng.integers(0, page_size - 40))
                current[row, at:at + int(rng.integers(1, 40))] = rng.integers(0, 256, dtype=np.uint8)
        elif style == 1:
            current[row] = 0
        elif style == 2:
            current[row] = rng.integers(0, 256, page_size, dtype=np.uint8)
        elif style == 3:
            current[row, ::int(rng.integers(2, 64))] ^= 0x5A
    return previous, current


def _mutate(rng: np.random.Generator, encoded: Encoded, chain: str) -> Encoded:
    payload = encoded.payload.tobytes()
    offsets = [int(o) for o in encoded.offsets]
    kinds = [int(k) for k in encoded.kinds]
    raw_size = int(encoded.raw_size)
    layer = chain.partition("+")[2]
    choice = int(rng.integers(0, 8 if layer else 6))
    if choice == 0 and payload:                                # flip bytes
        data = bytearray(payload)
        for _ in range(int(rng.integers(1, 5))):
            data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        payload = bytes(data)
    elif choice == 1:                                          # insert or delete bytes
        at = int(rng.integers(0, len(payload) + 1))
        if rng.random() < 0.5 and payload:
            payload = payload[:at] + payload[at + int(rng.integers(1, 9)):]
        else:
            payload = payload[:at] + rng.bytes(int(rng.integers(1, 9))) + payload[at:]
    elif choice == 2:                                          # an offset moves
        index = int(rng.integers(0, len(offsets)))
        offsets[index] = max(0, offsets[index] + int(rng.integers(-300, 300)))
    elif choice == 3:                                          # a kind changes
        kinds[int(rng.integers(0, len(kinds)))] = int(rng.integers(0, 7))
    elif choice == 4:                                          # truncated
        payload = payload[:int(rng.integers(0, len(payload) + 1))]
    elif choice == 5:                                          # a byte set to an edge value
        if payload:
            data = bytearray(payload)
            data[int(rng.integers(0, len(data)))] = int(rng.choice([0x00, 0x7F, 0x80, 0xFF]))
            payload = bytes(data)
    elif choice == 6:                                          # raw size lies
        raw_size = max(0, raw_size + int(rng.choice([-1, 1, 4096, 1 << 31, -raw_size])))
    else:                                                      # damage behind a valid frame
        raw = bytearray(_decompress(layer, payload, raw_size))
        if raw:
            for _ in range(int(rng.integers(1, 4))):
                raw[int(rng.integers(0, len(raw)))] ^= int(rng.integers(1, 256))
        payload = _compress(layer, bytes(raw))
    return Encoded(payload=np.frombuffer(payload, dtype=np.uint8), offsets=np.array(offsets, dtype=np.uint64),
                   kinds=np.array(kinds, dtype=np.uint8), codec=chain, raw_size=raw_size)


def _compress(layer: str, raw: bytes) -> bytes:
    if layer == "zstd":
        return zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    return lz4.block.compress(raw, store_size=False)


def _decompress(layer: str, payload: bytes, raw_size: int) -> bytes:
    if raw_size == 0:
        return b""
    if layer == "zstd":
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=max(raw_size, 1))
    return lz4.block.decompress(payload, uncompressed_size=raw_size)


def _check_case(chain: str, encoded: Encoded, previous: np.ndarray, guarded: GuardedRows, tally: CodecTally,
                label: str) -> None:
    codec = get_chain_codec(chain)
    expected = reference_decode(chain, encoded.payload.tobytes(), [int(o) for o in encoded.offsets],
                                [int(k) for k in encoded.kinds], int(encoded.raw_size), previous)
    replica = guarded.array
    replica[:] = previous
    tally.cases += 1
    try:
        codec.decode(encoded, replica)
        accepted = True
    except CorruptData:
        accepted = False
    except Exception as exc:        # anything else is a violation, named
        tally.violations.append(f"{label}: decode raised {exc.__class__.__name__}: {exc}")
        return
    if accepted != (expected is not None):
        tally.violations.append(f"{label}: decoder {'accepted' if accepted else 'rejected'}, "
                                f"the reference {'accepted' if expected is not None else 'rejected'}")
        return
    if expected is None:  # rejected, as the reference did
        tally.rejected += 1
        if not np.array_equal(replica, previous):
            tally.violations.append(f"{label}: a rejected batch changed the replica")
        return
    tally.accepted += 1
    if not np.array_equal(replica, expected):
        tally.violations.append(f"{label}: decoded pages differ from the reference's")
        return
    plain = codec.decompressed(encoded, previous.shape[1]) if isinstance(codec, ChainCodec) else encoded
    try:
        digests = get_page_codec(split_chain_name(chain)[0]).digest_decoded(plain, previous)
    except Exception as exc:
        tally.violations.append(f"{label}: digest_decoded raised {exc.__class__.__name__}: {exc}")
        return
    if not np.array_equal(digests, digest_pages(expected)):
        tally.violations.append(f"{label}: digest_decoded differs from the digests of the reference's pages")


def fuzz_codecs(runs: int, seed: int) -> CodecTally:
    """``runs`` mutated payloads (a tenth left intact as controls), cycling through every chain."""
    rng = np.random.default_rng(seed)
    tally = CodecTally()
    guards: dict[tuple[int, int], GuardedRows] = {}
    case = 0
    while case < runs:
        chain = CHAINS[case % len(CHAINS)]
        page_size = 4096 if not chain.startswith("native") else int(rng.choice([1024, 4096, 8192]))
        previous, current = _random_batch(rng, page_size)
        encoded = get_chain_codec(chain).encode(current, previous.copy())
        if previous.shape not in guards:
            guards[previous.shape] = GuardedRows(*previous.shape)
        guarded = guards[previous.shape]
        for _ in range(min(20, runs - case)):
            mutated = encoded if rng.random() < 0.1 else _mutate(rng, encoded, chain)
            _check_case(chain, mutated, previous, guarded, tally, f"seed {seed} case {case} ({chain})")
            case += 1
    return tally
