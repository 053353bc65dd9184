"""replica-sink: reconstructs each epoch, verifies it, and commits it atomically to the replica.

Policy (docs/FORMAT.md, section replica):
- An epoch is held (its encodings, and the digests of the pages they make from
  the committed pages, reconstructed one at a time and never written to the
  replica) until its EPOCH_END arrives; it is
  committed only if its page count and its digest (the
  sender's order-independent digest, recomputed over the reconstructed pages)
  check out, and only in order: epoch e follows the committed epoch e-1.
- A *baseline* epoch (every page of the layout, none encoded against the
  previous copy: the first epoch of a stream, or a resync) is committed over
  whatever the replica holds.
- A torn epoch (the next epoch or end of stream arrives before its commit
  record), a digest or count mismatch, or a gap in epoch numbers is discarded
  with a warning on the bus; the replica stays at its last committed epoch and
  the sink is *out of sync*: it asks the sender for a resync (ack channel) and
  discards epochs until a baseline epoch arrives. An empty replica starts out
  of sync.
- On start the sink asks for a resync (with an ack channel): it cannot know
  whether it joined mid-stream or missed epochs while it was down, and a
  sender that has not checkpointed yet loses nothing (its first epoch is a
  baseline anyway). Behind zmq-src, ``deframe resume=true`` skips the stream
  up to the segment that the resync epoch opens.
- Malformed pages (a page number outside the layout, an unknown codec, a
  payload that does not decode, an epoch over ``max-epoch``) raise CorruptData
  (``on-error=fail``, the default) or are treated like a torn epoch
  (``on-error=resync``). Nothing is ever written outside a commit.
- Failover: when the receiving source declares the sender lost (``zmq-src
  failover=true``: no message, heartbeats included, for its failover-after),
  the SENDER_LOST marker reaches the sink, which discards the epoch in
  progress (nothing partial is committed), makes the replica durable (fsync,
  also with ``fsync=false``), runs ``on-failover`` and posts a ``failover``
  bus message (fields: replica, epoch, silence, command_pid) for a Python
  caller to act on. From then on the replica is fenced: the lost sender's
  stream is stale and every epoch that still arrives is refused (and reported
  discarded on the ack channel), unless ``after-failover=resync``, which asks
  the returning sender for a resync and follows it again from its next full epoch.
- Memory: an open epoch costs its encodings plus ``ENTRY_COST`` bytes per page
  entry and ``BATCH_COST`` per batch (ZERO entries are kept as page numbers,
  never as pages); ``max-epoch`` bounds that cost. Beyond ``SPILL_BYTES`` held
  in memory, the epoch's encodings go to ``DIR/epoch.spill`` (deleted at
  commit or discard), so an epoch larger than memory (the first checkpoint of
  a big process) still commits. A payload's decompressed size is checked
  against what the epoch may still cost, and ``MAX_BATCH_RAW``, before
  anything is allocated.
- One stream at a time (wire version 2, docs/FORMAT.md "Stream identity"): the
  sink follows the identity of the epochs it commits (``stream_id`` in the
  manifest and in every acknowledgement). An epoch of another identity is
  committed only if it is a baseline and the sink asked for it: it is out of
  sync or has an unanswered resync request, or the followed stream is stale
  (ended, or silent since the sink started or for ``STALE_INTERVALS`` resync
  intervals). Otherwise it is refused (``epochs_refused``) without touching the
  replica, the sync state or the ack channel.
- One writer per replica: the sink holds ``DIR/lock`` (``ReplicaLock``) for
  its whole life; a second sink on the same directory fails with ReplicaLocked.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.batch import ENCODED, PAGES, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData, ReplicaError
from pipeline.stage import Property, Stage, StageContext
from stages.common.acks import AckSender
from stages.common.security import CurveProperties
from stages.codecs import ChainCodec, Codec, Encoded, get_codec
from stages.common.pages import combine_digests, digest_pages
from stages.common.checks import array_of
from stages.common.layout import Layout
from stages.common.replica_store import (DEFAULT_MAX_PAGES, ReplicaLock, ReplicaLocked, ReplicaStore, clear_replica,
                                         check_replica_directory, disk_free_bytes, ensure_replica_directory, replica_layout, verify_replica,
                                         zero_page_digest)


def _kind_table(*kinds: PageKind) -> np.ndarray:
    """A lookup table over every uint8 kind value: True for ``kinds`` (faster than np.isin)."""
    table = np.zeros(256, dtype=bool)
    table[list(kinds)] = True
    return table


_PAGES_KINDS = _kind_table(PageKind.NORMAL, PageKind.ZERO, PageKind.RAW, PageKind.FULL)
_ENCODED_KINDS = _kind_table(PageKind.ZERO, PageKind.RAW, PageKind.FULL, PageKind.DELTA, PageKind.UNCHANGED)
_USES_PREVIOUS = _kind_table(PageKind.DELTA, PageKind.UNCHANGED)
_RAW = int(PageKind.RAW)   # a plain int: comparing arrays with an IntEnum member is slower
_CODECS_KEPT = 8   # codec names are untrusted: keep only the first few looked up
SETTLE_INTERVAL = 0.002   # an unsettled commit (settle=idle) is settled this soon, between inputs


SPILL_BYTES = 8 << 20      # memory an open epoch holds before its encodings go to disk
MAX_BATCH_RAW = 64 << 20   # largest payload one batch may decompress to (decode's default max-batch)
ENTRY_COST = 8 + 8 + 1 + 8  # per page entry held: page number, digest, kind, offset
BATCH_COST = 2048          # per batch held: its arrays' and objects' bookkeeping
STALE_INTERVALS = 5        # a followed stream silent this many resync intervals is stale
REPEAT_LIMIT_INTERVALS = 32   # an unanswered resync request is repeated at doubling intervals up to this many
SPILL = "epoch.spill"


class EpochRejected(Exception):
    """An epoch cannot be committed; the message says why (internal to the sink)."""


class EpochRefused(EpochRejected):
    """An epoch of a stream the sink does not follow: dropped without changing the sink's state."""


class PendingEpoch:
    """One epoch held until its commit record: per batch, its page numbers, its encodings
    (plain run format) and the digests of the pages they reconstruct.

    ``cost`` is what the epoch costs in all (encodings, entries, batches); once more than
    ``SPILL_BYTES`` are held in memory they are appended to ``spill_path``, one group per
    run format, and read back (mapped) at commit.
    """

    def __init__(self, epoch: int, spill_path: Path | None = None):
        self.epoch = epoch
        self.page_numbers: list[np.ndarray] = []
        self.encodings: list[Encoded] = []
        self.digests: list[np.ndarray] = []
        self.cost = 0                # bytes the epoch costs, held or spilled
        self.held = 0                # of which held in memory
        self.page_bytes = 0          # bytes of the pages they make
        self.self_contained = True   # no page needs the previous copy
        self.doomed = ""             # why it will be discarded, once known
        self.spill_path = spill_path
        self.spilled: list[tuple[str, int, int, int]] = []   # (run format, entries, payload bytes, file offset)
        self._spill_size = 0

    def add(self, page_numbers: np.ndarray, encoding: Encoded, digests: np.ndarray, page_size: int) -> None:
        """Keep one batch: its encoding and the digests of the pages it reconstructs."""
        self.page_numbers.append(page_numbers)
        self.encodings.append(encoding)
        self.digests.append(digests)
        cost = self.batch_cost(page_numbers.shape[0], encoding.payload.nbytes)
        self.cost += cost
        self.held += cost
        self.page_bytes += page_numbers.shape[0] * page_size
        if self.held > SPILL_BYTES and self.spill_path is not None:
            self.spill()

    @staticmethod
    def batch_cost(entries: int, payload_bytes: int) -> int:
        return payload_bytes + entries * ENTRY_COST + BATCH_COST

    def spill(self) -> None:
        """Append the held batches to the spill file, merged per run format, and forget them."""
        if not self.encodings:
            return
        groups: dict[str, list[int]] = {}
        for index, encoding in enumerate(self.encodings):
            groups.setdefault(encoding.codec, []).append(index)
        parts: list = []
        for codec, indices in groups.items():
            encodings = [self.encodings[i] for i in indices]
            count = sum(e.kinds.shape[0] for e in encodings)
            payload = sum(e.payload.nbytes for e in encodings)
            self.spilled.append((codec, count, payload, self._spill_size))
            offsets, base = [np.zeros(1, dtype="<u8")], 0
            for e in encodings:
                offsets.append(np.asarray(e.offsets[1:], dtype="<u8") + np.uint64(base))
                base += int(e.offsets[-1])
            group = [*(np.ascontiguousarray(self.page_numbers[i], dtype="<u8") for i in indices),
                     *(np.ascontiguousarray(self.digests[i], dtype="<u8") for i in indices),
                     *(np.ascontiguousarray(e.kinds, dtype=np.uint8) for e in encodings), *offsets,
                     *(np.ascontiguousarray(e.payload, dtype=np.uint8) for e in encodings)]
            parts += group
            self._spill_size += 25 * count + 8 + payload
        path = self._spill_file()
        free = disk_free_bytes(path.parent)
        size = sum(memoryview(part).nbytes for part in parts)
        if free is not None and size > free:
            raise CorruptData(f"replica-sink: epoch {self.epoch} is larger than the free disk space "
                              f"({free} bytes) it would spill to")
        with open(path, "ab") as spill:
            for part in parts:
                spill.write(memoryview(part).cast("B"))
        self.page_numbers, self.encodings, self.digests, self.held = [], [], [], 0

    def doom(self, reason: str) -> None:
        self.doomed = self.doomed or reason
        self.page_numbers, self.encodings, self.digests, self.held = [], [], [], 0
        self.drop_spill()

    def _spill_file(self) -> Path:
        if self.spill_path is None:  # spilling happens only with a spill path
            raise ReplicaError(f"replica-sink: epoch {self.epoch} has no spill file")
        return self.spill_path

    def drop_spill(self) -> None:
        if self.spilled and self.spill_path is not None:
            self.spill_path.unlink(missing_ok=True)
        self.spilled = []

    def gathered(self) -> tuple[np.ndarray, list[Encoded], np.ndarray]:
        """All page numbers, encodings and digests of the epoch (spilled ones mapped from the file)."""
        if self.spilled:
            self.spill()
            data = np.memmap(self._spill_file(), dtype=np.uint8, mode="r")
            numbers, digests, encodings = [], [], []
            for codec, count, payload, at in self.spilled:
                numbers.append(data[at:at + 8 * count].view("<u8"))
                digests.append(data[at + 8 * count:at + 16 * count].view("<u8"))
                kinds = data[at + 16 * count:at + 17 * count]
                offsets = data[at + 17 * count:at + 25 * count + 8].view("<u8").copy()   # aligned for the kernels
                body = data[at + 25 * count + 8:at + 25 * count + 8 + payload]
                encodings.append(Encoded(payload=body, offsets=offsets, kinds=kinds, codec=codec, raw_size=payload))
            return np.concatenate(numbers), encodings, np.concatenate(digests)
        empty = np.empty(0, dtype=np.uint64)
        return (np.concatenate([empty, *self.page_numbers]), self.encodings,
                np.concatenate([empty, *self.digests]))


class ReplicaSink(CurveProperties, Stage):
    """Applies verified epochs atomically to a replica directory and acknowledges them."""

    factory_name = "replica-sink"
    description = "Keep a replica on disk: verify each epoch, commit it atomically, acknowledge it"
    input_caps = (ENCODED, PAGES)
    output_caps = None
    max_workers = 1

    path = Property("str", "", "Replica directory (created if missing)", required=True)
    fsync = Property("bool", True, "fsync journal, image and manifest at every commit (power-loss safety)")
    settle = Property("choice", "idle", "With fsync: acknowledge an epoch once its journal is durable and flush "
                      "the rest while idle (idle), or only after every flush (commit); equally safe",
                      choices=("idle", "commit"))
    ack_endpoint = Property("endpoint", "", "Sender's ack listener, e.g. tcp://127.0.0.1:5556 ('' = no acks); on tcp give "
                            "secret-key= and server-key= (the sender's public key)")
    ack_bind = Property("bool", False, "Bind the ack socket instead of connecting it")
    ack_queue = Property("int", 10000, "Ack messages held for a sender that is not reading; beyond, dropped "
                         "with a warning", minimum=1)
    on_error = Property("choice", "fail", "Malformed pages: fail the pipeline, or discard the epoch and resync",
                        choices=("fail", "resync"))
    max_epoch = Property("size", "256GiB", "Largest epoch held until its commit record: its encodings plus "
                         f"{ENTRY_COST} bytes per page entry (beyond {SPILL_BYTES >> 20} MiB it is spilled to disk)",
                         minimum=4096)
    max_pages = Property("int", DEFAULT_MAX_PAGES, "Largest layout accepted, in pages", minimum=1)
    verify_on_start = Property("bool", True, "Check every page of an existing replica before resuming from it")
    resync_interval = Property("duration", "2s", "Repeat an unanswered resync request after this long (while "
                               "nothing arrives: at doubling intervals, up to 32 times this)", minimum=0.001)
    force = Property("bool", False, "Write the replica into a non-empty directory that is not a replica "
                     "(by default refused: a replica is marked by its manifest and lock file)")
    on_failover = Property("str", "", "Shell command run once the sender is lost (zmq-src failover=true), with "
                           "PAGEPIPE_REPLICA and PAGEPIPE_EPOCH in its environment; it outlives the pipeline")
    after_failover = Property("choice", "refuse", "A sender heard again after failover: refuse its epochs (stale), "
                              "or ask it for a resync and follow it again", choices=("refuse", "resync"))

    def start(self, context: StageContext) -> None:
        super().start(context)
        if not self.path:
            raise ConfigError("replica-sink: property path is required")
        self.counters.update(epochs_committed=0, epochs_discarded=0, epochs_refused=0, pages_applied=0,
                             bytes_applied=0, epochs_spilled=0, resyncs_requested=0, acks_dropped=0,
                             commit_seconds=0.0, last_epoch=0, failovers=0)
        self.lock: ReplicaLock | None = None
        check_replica_directory(self.path, self.force)
        self.failed_over = False
        """True once the sender was declared lost: the replica is fenced (see after-failover)."""
        self._refused_epoch: int | None = None
        self.store = self._open_store()
        self._spill_path = Path(self.path) / SPILL
        self._spill_path.unlink(missing_ok=True)    # an epoch a killed sink was holding
        self.stream_id: str | None = self.store.manifest.get("stream_id")   # the stream followed
        self._last_seen = -float("inf")             # when the followed stream last closed an epoch here
        self._followed_ended = False
        self._resync_pending = False
        self._last_input = time.monotonic()         # when a batch last reached the sink (_repeat_resync_request)
        self._repeat_after = self.resync_interval   # how long an unanswered request waits before it is repeated
        self.layout: Layout | None = self.store.layout
        self.in_sync = not self.store.is_empty
        self.pending: PendingEpoch | None = None
        self._codecs: dict[str, Codec] = {}
        self._last_resync_request = -float("inf")
        self.acks = AckSender(self.ack_endpoint, bind=self.ack_bind, queue=self.ack_queue, secret_key=self.secret_key,
                              server_key=self.server_key, authorized_keys=self.authorized_keys,
                              insecure=self.insecure) if self.ack_endpoint else None   # keys: stages.common.security
        self._ask_resync(f"receiver started, replica at epoch {self.store.epoch}")

    def _open_store(self) -> ReplicaStore:
        """Open the replica; an inconsistent one is cleared (and later resynchronised).

        A path that cannot hold a replica (a file, no permission) raises ReplicaError naming it.
        """
        ensure_replica_directory(self.path)
        self.lock = ReplicaLock(self.path)        # held until stop(); ReplicaLocked if another sink has it
        try:
            store = ReplicaStore(self.path, fsync=self.fsync, max_pages=self.max_pages, lock=self.lock,
                                 settle_later=self.settle == "idle")
            if store.recovered_journal != "none":
                self.context.warn(f"replica-sink: {store.recovered_journal} an interrupted commit in {self.path}")
            if not store.is_empty and self.verify_on_start:
                report = verify_replica(self.path)
                if not report.ok:
                    raise ReplicaError("; ".join(report.problems))
            return store
        except ReplicaLocked:
            raise
        except ReplicaError as exc:
            self.context.warn(f"replica-sink: replica {self.path} is inconsistent, starting empty: {exc}")
            clear_replica(self.path)
            return ReplicaStore(self.path, fsync=self.fsync, max_pages=self.max_pages, lock=self.lock,
                                settle_later=self.settle == "idle")

    # ---- data ----------------------------------------------------------
    def process(self, batch: Batch) -> Iterable[Batch]:
        self._last_input = time.monotonic()
        if self.failed_over and self._fenced(batch):
            return ()
        pending = self._pending_for(batch.epoch)
        if pending.doomed:
            return ()
        try:
            reconstructed = self._reconstruct(batch, pending)
            if reconstructed is not None:
                self._check_cost(pending, pending.batch_cost(batch.npages, reconstructed[1].payload.nbytes), batch)
                spilled = bool(pending.spilled)
                pending.add(*reconstructed, batch.page_size)
                self.counters["epochs_spilled"] += bool(pending.spilled) and not spilled
        except CorruptData as exc:
            if self.on_error == "fail":
                raise
            self._doom(pending, str(exc))
            return ()
        if reconstructed is None:
            self._doom(pending, "replica out of sync; waiting for a full resync")
        return ()

    def _check_cost(self, pending: PendingEpoch, cost: int, batch: Batch) -> None:
        if pending.cost + cost > self.max_epoch:
            raise CorruptData(f"replica-sink: epoch {batch.epoch} exceeds max-epoch={self.max_epoch} bytes "
                              f"(encodings plus {ENTRY_COST} bytes per page entry)")

    def _pending_for(self, epoch: int) -> PendingEpoch:
        if self.pending is not None and self.pending.epoch != epoch:
            self._discard(self.pending, f"torn: epoch {epoch} began before its commit record")
            self.pending = None
        if self.pending is None:
            self.pending = PendingEpoch(epoch, self._spill_path)
        return self.pending

    def _reconstruct(self, batch: Batch, pending: PendingEpoch) -> tuple[np.ndarray, Encoded, np.ndarray] | None:
        """Check a data batch and digest the pages it makes from the committed pages it touches.

        Returns (page numbers, plain encoding, digests of the reconstructed pages), or None
        when the batch needs previous pages the out-of-sync replica does not have.
        """
        where = f"replica-sink: epoch {batch.epoch} sequence {batch.sequence}"
        if self.layout is None:
            raise CorruptData(f"{where}: pages before any layout record")
        if batch.page_size != self.layout.page_size:
            raise CorruptData(f"{where}: page size {batch.page_size} != layout page size {self.layout.page_size}")
        page_numbers, kinds = batch.page_numbers.copy(), batch.kinds
        if kinds.shape != page_numbers.shape:   # the rest is checked by Batch.from_frames and the codec
            raise CorruptData(f"{where}: {kinds.shape[0]} kinds for {page_numbers.shape[0]} pages")
        outside = self.layout.outside(page_numbers)
        if outside.any():
            index = int(np.argmax(outside))
            raise CorruptData(f"{where}: page {index} has page number {int(page_numbers[index])} "
                              f"outside the layout ({self.layout.total_pages} pages)")
        allowed = _ENCODED_KINDS if batch.format == ENCODED else _PAGES_KINDS
        bad_kind = ~allowed[kinds]
        if bad_kind.any():
            index = int(np.argmax(bad_kind))
            raise CorruptData(f"{where}: page {index} has kind {int(kinds[index])}, invalid in a {batch.format} batch")
        if batch.format == PAGES:
            if batch.data is None or batch.data.shape != (batch.npages, batch.page_size):
                raise CorruptData(f"{where}: pages batch without data for its {batch.npages} pages")
            return (page_numbers, *self._whole_pages(batch, kinds))
        uses_previous = _USES_PREVIOUS[kinds]
        if uses_previous.any():
            pending.self_contained = False
            if not self.in_sync:
                return None
        encoding = self._plain_encoding(batch, where)
        try:
            digests = self.store.decoded_digests(encoding, page_numbers, batch.page_size)
        except (ConfigError, ValueError, TypeError) as exc:  # CorruptData is a ValueError
            raise CorruptData(f"{where}: {exc}") from None
        return page_numbers, encoding, digests

    def _whole_pages(self, batch: Batch, kinds: np.ndarray) -> tuple[Encoded, np.ndarray]:
        """A PAGES batch as a ``native`` whole-page encoding, and its digests: ZERO entries stay entries
        (no page is copied or digested for them), the other pages are copied once."""
        carries = kinds != PageKind.ZERO
        data = array_of(batch, "data", "replica-sink")
        rows = np.array(data[carries] if not carries.all() else data, dtype=np.uint8, copy=True)
        encoded_kinds = np.where(carries, np.uint8(PageKind.FULL), np.uint8(PageKind.ZERO)).astype(np.uint8)
        offsets = np.zeros(kinds.shape[0] + 1, dtype=np.uint64)
        np.cumsum(carries * np.uint64(batch.page_size), out=offsets[1:])
        digests = np.full(kinds.shape[0], zero_page_digest(batch.page_size), dtype=np.uint64)
        digests[carries] = digest_pages(rows)
        payload = rows.reshape(-1)
        return Encoded(payload=payload, offsets=offsets, kinds=encoded_kinds, codec="native",
                       raw_size=int(payload.size)), digests

    def _plain_encoding(self, batch: Batch, where: str) -> Encoded:
        """The batch's encodings in its plain run format: entropy layers undone, RAW as FULL."""
        chain = batch.meta.get("codec")
        if not isinstance(chain, str):
            raise CorruptData(f"{where}: encoded batch names no codec")
        try:
            codec = self._codec(chain)
        except (ConfigError, KeyError, ValueError):
            raise CorruptData(f"{where}: unknown codec {chain!r}") from None
        if batch.payload is None or batch.offsets is None:
            raise CorruptData(f"{where}: encoded batch without payload or offsets")
        raw_size = batch.meta.get("raw_size", int(batch.offsets[-1]) if batch.npages else 0)
        kinds = batch.kinds
        raw = kinds == _RAW
        if raw.any():
            kinds = np.where(raw, np.uint8(PageKind.FULL), kinds).astype(np.uint8)
        encoding = Encoded(payload=batch.payload, offsets=batch.offsets, kinds=kinds, codec=chain, raw_size=raw_size)
        if isinstance(codec, ChainCodec):
            if not isinstance(raw_size, int) or isinstance(raw_size, bool):
                raise CorruptData(f"{where}: raw size {raw_size!r} is not a byte count")
            if raw_size > MAX_BATCH_RAW:
                raise CorruptData(f"{where}: payload would decompress to {raw_size} bytes, more than the "
                                  f"{MAX_BATCH_RAW} a batch may")
            if self.pending is not None:
                self._check_cost(self.pending, PendingEpoch.batch_cost(batch.npages, raw_size), batch)
            try:
                encoding = codec.decompressed(encoding, batch.page_size)
            except (ValueError, TypeError) as exc:
                raise CorruptData(f"{where}: {exc}") from None
        return encoding

    def _codec(self, name: str) -> Codec:
        """``get_codec(name)``, kept for the next batch (a few names per stream; this sink's own
        objects, since entropy codecs hold per-thread contexts)."""
        codec = self._codecs.get(name)
        if codec is None:
            codec = get_codec(name)
            if len(self._codecs) < _CODECS_KEPT:
                self._codecs[name] = codec
        return codec

    # ---- control ---------------------------------------------------------
    def control(self, batch: Batch) -> Iterable[Batch]:
        self._last_input = time.monotonic()
        if batch.flags & Flag.SENDER_LOST:
            self._fail_over(batch)
            return ()
        if self.failed_over and batch.flags & (Flag.LAYOUT | Flag.EPOCH_END) and self._fenced(batch):
            return ()
        if batch.flags & Flag.LAYOUT:
            self._set_layout(batch)
        if batch.flags & Flag.EPOCH_END:
            pending = self._pending_for(batch.epoch)
            self.pending = None
            if self.stream_id is not None and batch.meta.get("stream_id") == self.stream_id:
                self._last_seen = time.monotonic()
            try:
                self._commit(pending, batch)
            except EpochRefused as exc:
                self._refuse(pending, str(exc))
            except EpochRejected as exc:
                self._discard(pending, str(exc))
            finally:
                pending.drop_spill()
        if batch.flags & Flag.END_OF_STREAM:
            if self.pending is not None:
                self._discard(self.pending, "torn: the stream ended before its commit record")
                self.pending = None
            if self._follows(batch):
                self._followed_ended = True
        return ()

    def _follows(self, marker: Batch) -> bool:
        """Whether a control batch belongs to the stream this sink follows (any, for version 1 streams)."""
        identity = marker.meta.get("stream_id")
        return identity is None or self.stream_id is None or identity == self.stream_id

    def _check_identity(self, marker: Batch, baseline: bool) -> None:
        """EpochRefused unless the epoch's stream may be committed (see the module docstring)."""
        if self._follows(marker):
            return
        stale = self._followed_ended or time.monotonic() - self._last_seen > STALE_INTERVALS * self.resync_interval
        asked = not self.in_sync or self._resync_pending
        if not baseline or not (stale or asked):
            raise EpochRefused(f"stream {marker.meta.get('stream_id')} is not the stream {self.stream_id} this "
                               f"replica follows, which is live and did not ask for a resync")

    def _set_layout(self, batch: Batch) -> None:
        try:
            layout = replica_layout(batch.page_size, batch.meta.get("regions"), max_pages=self.max_pages)
            self.store.check_room(layout)       # before anything is allocated for it
        except ReplicaError as exc:
            raise CorruptData(f"replica-sink: epoch {batch.epoch} layout record: {exc}") from None
        if self.layout is not None and layout.page_size != self.layout.page_size:
            self.in_sync = False
        self.layout = layout

    def _commit(self, pending: PendingEpoch, marker: Batch) -> None:
        epoch = pending.epoch
        if pending.doomed:
            raise EpochRejected(pending.doomed)
        page_numbers, encodings, digests = pending.gathered()
        expected, digest = marker.meta.get("pages"), marker.meta.get("digest")
        if expected != page_numbers.shape[0]:
            raise EpochRejected(f"torn: commit record says {expected!r} pages, {page_numbers.shape[0]} arrived")
        if not isinstance(digest, int):
            raise EpochRejected(f"commit record carries no digest ({digest!r})")
        ordered = np.sort(page_numbers)
        if ordered.size and (ordered[1:] == ordered[:-1]).any():
            raise EpochRejected("a page number appears twice")
        if self.layout is None:
            raise EpochRejected("no layout record before the commit record")
        if epoch < 1:   # epoch 0 is the empty replica's number: committing it would leave the store "empty"
            raise EpochRejected(f"epoch {epoch}: checkpoints are numbered from 1")
        baseline = pending.self_contained and page_numbers.shape[0] == self.layout.page_count
        self._check_identity(marker, baseline)
        if marker.flags & Flag.RESYNC and not baseline:
            raise EpochRejected(f"a resync epoch must carry every page of its layout whole "
                                f"({page_numbers.shape[0]} of {self.layout.page_count} pages)")
        if not baseline and not self.in_sync:
            raise EpochRejected("replica out of sync; waiting for a full resync")
        if not baseline and epoch != self.store.epoch + 1:
            raise EpochRejected(f"gap: replica is at epoch {self.store.epoch}")
        actual = combine_digests(page_numbers, digests)
        if actual != digest & 0xFFFFFFFFFFFFFFFF:
            raise EpochRejected(f"digest mismatch: reconstructed {actual:#018x}, sender {digest:#018x}")
        started = time.perf_counter()
        identity = marker.meta.get("stream_id")
        identity_fields = {"stream_id": identity} if identity is not None else {}
        self.store.commit(epoch, self.layout, page_numbers, encodings, digests, digest,
                          stream=marker.stream, resync=bool(marker.flags & Flag.RESYNC), **identity_fields)
        if identity != self.stream_id:
            self.stream_id, self._followed_ended = identity, False
        self._last_seen = time.monotonic()
        self._resync_pending = False
        self._repeat_after = self.resync_interval
        self.in_sync = True
        if self.failed_over:
            self.failed_over = False
            self.context.warn(f"replica-sink: following the sender again from its resync epoch {epoch} "
                              f"(after-failover=resync)")
        self._last_resync_request = -float("inf")   # answered: a later problem asks again at once
        self.counters["commit_seconds"] += time.perf_counter() - started
        self.counters["epochs_committed"] += 1
        self.counters["pages_applied"] += page_numbers.shape[0]
        self.counters["bytes_applied"] += pending.page_bytes
        self.counters["last_epoch"] = epoch
        record: dict[str, float] = {"applied_bytes": pending.page_bytes,
                                    "resync": int(bool(marker.flags & Flag.RESYNC))}
        when = marker.meta.get("time")
        if isinstance(when, (int, float)) and not isinstance(when, bool):
            record["commit_latency_seconds"] = max(0.0, time.time() - when)
        self.context.record_epoch(epoch, **record)
        if self.store.unsettled:
            self.tick_interval = SETTLE_INTERVAL    # settle soon, between inputs
        if self.acks is not None and not self.acks.ack(epoch, stream=marker.stream, **identity_fields):
            self._ack_dropped(f"acknowledgement of epoch {epoch}")

    def tick(self) -> Iterable[Batch]:
        """Between inputs: finish the last commit's flushes (``settle=idle``) before the next epoch needs them,
        and repeat an unanswered resync request. The timer runs only while one of them waits."""
        self.store.settle()
        if self._awaits_resync():
            self._repeat_resync_request()
        self.tick_interval = self.resync_interval if self._awaits_resync() else 0.0
        return ()

    def _awaits_resync(self) -> bool:
        return self._resync_pending and self.acks is not None and not self.failed_over

    def _repeat_resync_request(self) -> None:
        """Ask again for a resync when nothing at all has arrived since asking: the answer may have vanished
        with a connection the sender had not yet seen close, and a restarted receiver's ``deframe resume=true``
        passes nothing on before a resync segment. Epochs that do arrive and are discarded ask by themselves
        (``_discard``). The wait doubles with each repeat (a sender that is not running yet is not flooded)."""
        waited = time.monotonic() - max(self._last_input, self._last_resync_request)
        if waited < self._repeat_after:
            return
        self._repeat_after = min(2 * self._repeat_after, REPEAT_LIMIT_INTERVALS * self.resync_interval)
        self._ask_resync(f"no resync arrived: nothing reached the receiver for {waited:.2f} s after asking")

    # ---- failover --------------------------------------------------------
    def _fail_over(self, marker: Batch) -> None:
        """The sender is lost: drop the epoch in progress, make the replica durable, run on-failover, post
        ``failover``; then fence the replica."""
        if self.failed_over:
            return
        if self.pending is not None:
            self.counters["epochs_discarded"] += 1
            self.context.warn(f"replica-sink: epoch {self.pending.epoch} discarded (torn: the sender was lost "
                              f"before its commit record); replica stays at epoch {self.store.epoch}")
            self.pending = None
        self.store.sync()
        self.failed_over = True
        self.in_sync = False
        self.counters["failovers"] += 1
        silence = marker.meta.get("silence")
        pid = self._run_failover_command(silence) if self.on_failover else None
        self.context.warn(f"replica-sink: sender lost; failing over at epoch {self.store.epoch} of {self.path}"
                          + (f" (on-failover started pid {pid})" if pid else ""))
        self.context.post("failover", replica=str(os.path.abspath(self.path)), epoch=self.store.epoch,
                          silence=silence, last_heard=marker.meta.get("last_heard"), command_pid=pid)

    def _run_failover_command(self, silence: object) -> int:
        """Start on-failover in a session of its own, not waited for: the one process pagepipe starts that
        deliberately outlives the pipeline (it is how the backup takes over)."""
        environment = {**os.environ, "PAGEPIPE_REPLICA": os.path.abspath(self.path),
                       "PAGEPIPE_EPOCH": str(self.store.epoch), "PAGEPIPE_SILENCE": f"{silence}"}
        child = subprocess.Popen(self.on_failover, shell=True, env=environment, stdin=subprocess.DEVNULL,
                                 start_new_session=True, close_fds=True)
        return child.pid

    def _fenced(self, batch: Batch) -> bool:
        """After failover: True if this batch of the stale sender is refused (always, unless after-failover=
        resync, which asks the sender for a resync and lets its batches through to wait for a full epoch)."""
        if self.after_failover == "resync":
            self._ask_resync("the replica failed over; rejoining the sender needs a full epoch")
            return False
        if self._refused_epoch != batch.epoch:
            self._refused_epoch = batch.epoch
            self.counters["epochs_refused"] += 1
            self.context.warn(f"replica-sink: epoch {batch.epoch} refused: the replica failed over at epoch "
                              f"{self.store.epoch} and this sender is stale (after-failover=resync accepts it)")
        if batch.flags & Flag.EPOCH_END and self.acks is not None:
            self.acks.discarded(batch.epoch, "the replica failed over; this sender is stale")
        return True

    def _doom(self, pending: PendingEpoch, reason: str) -> None:
        pending.doom(reason)
        self._ask_resync(reason)

    def _refuse(self, pending: PendingEpoch, reason: str) -> None:
        """Drop an epoch of a foreign stream: no state changes, no message to the sender being followed."""
        self.counters["epochs_refused"] += 1
        self.context.warn(f"replica-sink: epoch {pending.epoch} refused ({reason}); "
                          f"replica stays at epoch {self.store.epoch}")

    def _discard(self, pending: PendingEpoch, reason: str) -> None:
        """Drop an epoch that cannot be committed; the replica keeps its last committed epoch."""
        pending.drop_spill()
        self.counters["epochs_discarded"] += 1
        self.context.record_epoch(pending.epoch, discarded=1)
        self.context.warn(f"replica-sink: epoch {pending.epoch} discarded ({reason}); "
                          f"replica stays at epoch {self.store.epoch}", event="discarded", epoch=pending.epoch)
        self.in_sync = False
        if self.acks is not None and not self.acks.discarded(pending.epoch, reason):
            self._ack_dropped(f"discard notice of epoch {pending.epoch}")
        self._ask_resync(reason)

    def _ask_resync(self, reason: str) -> None:
        now = time.monotonic()
        if self.acks is None or now - self._last_resync_request < self.resync_interval:
            return
        self._last_resync_request = now
        self._resync_pending = True
        if self.acks is not None and not self.tick_interval:
            self.tick_interval = self.resync_interval   # tick: repeat the request if nothing arrives
        self.counters["resyncs_requested"] += 1
        self.context.event("resync", f"replica-sink: asked the sender for a resync ({reason})")
        if not self.acks.request_resync(reason, epoch=self.store.epoch):
            self._ack_dropped("resync request")

    def _ack_dropped(self, what: str) -> None:
        """The back channel's queue is full (the sender stopped reading): say so rather than lose it silently."""
        self.counters["acks_dropped"] += 1
        self.context.warn(f"replica-sink: {what} dropped: the ack channel {self.ack_endpoint} is full")

    def stop(self) -> None:
        pending = getattr(self, "pending", None)
        if pending is not None:
            self._discard(pending, "torn: the pipeline stopped before its commit record")
            self.pending = None
        acks = getattr(self, "acks", None)
        if acks is not None:
            acks.close()
            self.acks = None
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
            self.lock = None
