"""Channel-failure benchmark: cut one channel's connection at random moments; no partial epoch may commit.

``pagepipe bench channels [--kills 50] [--channels 3] [--mode lanes|spread]``. Each round runs a
receiver (``zmq-src channels=C workers=C ! deframe ! decode ! replica-sink``) and a
sender (``test-src pattern=random resync=true ! classify ! xor-delta ! rle ! frame workers=C !
zmq-sink channels=C``: each of C frame workers frames its share of every epoch as a lane on its own
channel; ``--mode spread``: one frame worker, its stream spread over the C channels and
received by one ``zmq-src channels=C``) in process mode over tcp on this machine (loopback,
``insecure=true``: the relay stands for the network), with one
channel routed through a TCP relay (``CuttableRelay``) that drops its
connections, data in flight included, at a random moment once the stream
flows through it. ZeroMQ reconnects;
what was in flight is lost, so the receiver must fail the stream (or, when
nothing was lost, finish it), and the replica must hold exactly one committed
checkpoint: every page exactly as the sender wrote it in the epoch its
manifest names (test-src's random pages are reproducible per epoch). Reported: rounds, streams completed, streams failed, partial epochs
committed (target 0). Exit status 1 if a partial epoch was committed.
"""
from __future__ import annotations

import argparse
import json
import random
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zmq

from pipeline.colocation import POLICIES
from pipeline.errors import PagepipeError
from pipeline.pipeline import Pipeline
from pipeline.stage import StageContext
from stages.basic import TestSource
from stages.common.replica_store import ReplicaStore, load_replica


PAGE_SIZE = 4096
BATCH_PAGES = 32


class CuttableRelay:
    """A TCP relay from a local port to ``target`` whose connections can be cut at any moment (RST, data lost)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.cuts = 0
        self.relayed = 0    # bytes relayed so far
        self._thread = threading.Thread(target=self._serve, name="cuttable-relay", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sockets: dict[socket.socket, socket.socket] = {}
        while not self._closed:
            with self._lock:
                sockets = {a: b for pair in self._pairs for a, b in (pair, pair[::-1])}
            try:
                readable, _, _ = select.select([self._listener, *sockets], [], [], 0.02)
            except (OSError, ValueError):   # a connection was cut (closed) meanwhile: look again
                continue
            for ready in readable:
                if ready is self._listener:
                    self._accept()
                    continue
                peer = sockets[ready]
                try:
                    data = ready.recv(1 << 16)
                    if not data:
                        raise OSError("closed")
                    peer.sendall(data)
                    self.relayed += len(data)
                except OSError:
                    self._drop(ready)

    def _accept(self) -> None:
        try:
            incoming, _ = self._listener.accept()
            outgoing = socket.create_connection(self.target, timeout=2)
        except OSError:
            return
        with self._lock:
            self._pairs.append((incoming, outgoing))

    def _drop(self, member: socket.socket) -> None:
        with self._lock:
            for pair in [pair for pair in self._pairs if member in pair]:
                self._pairs.remove(pair)
                for end in pair:
                    _reset(end)

    def cut(self) -> None:
        """Reset every relayed connection now; whatever they carried is lost."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for end in pair:
                _reset(end)
        self.cuts += 1

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.cut()
        self._listener.close()


def _reset(end: socket.socket) -> None:
    try:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    end.close()


def free_ports(count: int) -> list[int]:
    """``count`` consecutive-free tcp ports on 127.0.0.1 (probed, then released)."""
    with zmq.Context() as context:
        probes = [context.socket(zmq.PULL) for _ in range(count)]
        try:
            return [probe.bind_to_random_port("tcp://127.0.0.1") for probe in probes]
        finally:
            for probe in probes:
                probe.close(0)


@dataclass
class Round:
    completed: bool       # the stream reached its end
    committed_epoch: int  # what the replica holds (-1: nothing committed)
    partial: bool         # the replica's pages are not exactly that one epoch's
    failure: str = ""     # why the receiver failed, if it did


def source_pages(epoch: int, pages: int) -> np.ndarray:
    """The pages test-src (pattern=random, seed 0) writes in ``epoch``: what a replica at that epoch holds."""
    source = TestSource(epochs=epoch + 1, pages=pages, batch_pages=BATCH_PAGES, pattern="random")
    source.start(StageContext("test-src"))
    image = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
    for batch in source.produce():
        if batch.epoch == epoch and not batch.is_control and batch.data is not None:
            image[batch.page_numbers] = batch.data
    return image


def replica_state(path: Path, pages: int) -> tuple[int, bool]:
    """(committed epoch or -1 when nothing is committed, whether the replica holds exactly that epoch's pages)."""
    store = ReplicaStore(path, fsync=False, writable=False)
    try:
        if store.is_empty:
            return -1, True
        epoch = store.epoch
    finally:
        store.close()
    (memory,) = load_replica(path).values()
    return epoch, bool(np.array_equal(memory.reshape(-1, PAGE_SIZE)[:pages], source_pages(epoch, pages)))


MODES = ("lanes", "spread")


def run_round(directory: Path, channels: int, epochs: int, pages: int, cut_after: float | None,
              rng: random.Random, mode: str = "lanes", colocate: str = "none") -> Round:
    """One sender/receiver pair with channel 1 (of ``channels``) through a relay cut ``cut_after`` s in."""
    ports = free_ports(channels)
    relay = CuttableRelay(("127.0.0.1", ports[1 % channels]))
    sender_endpoints = [f"tcp://127.0.0.1:{port}" for port in ports]
    sender_endpoints[1 % channels] = f"tcp://127.0.0.1:{relay.port}"
    replica = directory / f"replica-{rng.randrange(1 << 30)}"
    workers = f"workers={channels}" if mode == "lanes" else ""
    receiver = Pipeline.parse(
        f"zmq-src endpoint={','.join(f'tcp://127.0.0.1:{port}' for port in ports)} channels={channels} timeout=3s "
        f"insecure=true {workers} "
        f"! deframe ! decode ! replica-sink path={replica} fsync=false")
    sender = Pipeline.parse(
        f"test-src epochs={epochs} pages={pages} batch-pages={BATCH_PAGES} pattern=random resync=true ! classify "
        f"! xor-delta ! rle ! frame {workers} "
        f"! zmq-sink endpoint={','.join(sender_endpoints)} channels={channels} timeout=3s insecure=true")
    completed, failure = False, ""
    try:
        with receiver.start(mode="process", colocate=colocate) as received:
            with sender.start(mode="process", colocate=colocate) as sending:
                if cut_after is not None:
                    deadline = time.monotonic() + 30
                    while relay.relayed < 1 << 16 and time.monotonic() < deadline:
                        time.sleep(0.005)          # the stream is flowing through the relayed channel
                    time.sleep(cut_after)
                    relay.cut()
                try:
                    sending.wait(timeout=60)
                except PagepipeError:
                    pass
            try:
                received.wait(timeout=60)
                completed = True
            except PagepipeError as exc:
                failure = str(exc).splitlines()[0][:300]
    finally:
        relay.close()
    epoch, exact = replica_state(replica, pages)
    partial = not exact
    shutil.rmtree(replica, ignore_errors=True)
    return Round(completed, epoch, partial, failure)


def run_rounds(kills: int, channels: int, epochs: int, pages: int, seed: int = 0,
               window: float = 1.0, mode: str = "lanes", colocate: str = "none") -> list[Round]:
    """``kills`` rounds, each cutting channel 1 at a random moment in the ``window`` seconds after the stream
    began to flow through it."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="pagepipe-channels-") as directory:
        return [run_round(Path(directory), channels, epochs, pages, rng.uniform(0.0, window), rng, mode, colocate)
                for _ in range(kills)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench channels", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="rounds, each cutting one channel once")
    parser.add_argument("--channels", type=int, default=3, help="channels of the stream (at least 2)")
    parser.add_argument("--epochs", type=int, default=40, help="checkpoints each sender sends")
    parser.add_argument("--pages", type=int, default=512, help="pages per checkpoint")
    parser.add_argument("--window", type=float, default=1.0, help="cuts fall at a random moment in this many "
                                                                    "seconds after data began to flow")
    parser.add_argument("--mode", choices=MODES, default="lanes", help="lanes: frame workers=C, each sending "
                        "one lane on its own channel (default); spread: one stream spread over the C channels")
    parser.add_argument("--colocate", choices=POLICIES, default="none", help="how single-worker neighbours share "
                        "processes (pipeline.colocation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.channels < 2 or args.epochs < 1 or args.pages < 2:
        print("bench channels: --kills >= 1, --channels >= 2, --epochs >= 1, --pages >= 2", file=sys.stderr)
        return 2
    started = time.monotonic()
    rounds = run_rounds(args.kills, args.channels, args.epochs, args.pages, args.seed, args.window, args.mode,
                        args.colocate)
    figures = {"mode": args.mode, "rounds": len(rounds), "completed": sum(r.completed for r in rounds),
               "failed": sum(not r.completed for r in rounds), "partial_epochs_committed": sum(r.partial for r in rounds),
               "committed_epochs": [r.committed_epoch for r in rounds], "seconds": time.monotonic() - started}
    print(f"{figures['rounds']} rounds ({args.mode}) cutting 1 of {args.channels} channels at a random moment: "
          f"{figures['completed']} streams completed (nothing was in flight), {figures['failed']} failed "
          f"(a lost message detected), {figures['partial_epochs_committed']} partial epochs committed "
          f"(target 0: {'met' if figures['partial_epochs_committed'] == 0 else 'MISSED'}); "
          f"{figures['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({**figures, "rounds_detail": [asdict(r) for r in rounds]}, indent=2))
    return 1 if figures["partial_epochs_committed"] else 0


if __name__ == "__main__":
    sys.exit(main())
