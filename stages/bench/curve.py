"""CurveZMQ cost: raw pyzmq with and without CURVE, and the sender chain over an encrypted tcp link.

``pagepipe bench curve [--rounds 4] [--repeats 3] [--seconds 2]``, medians over repeats:

- ``raw``: one PUSH -> PULL pair over tcp loopback in this process, 1 MiB messages (as zmq-sink
  sends them), plain and with CURVE: GB/s, and the CURVE / plain ratio;
- ``sender chain``: ``trace-src preload=true ! classify ! xor-delta ! rle ! zstd ! frame ! zmq-sink``
  (CURVE keys, tcp loopback) into a receiving pipeline ``zmq-src ! null-sink`` in process mode, over
  the memcached corpus (its recorded epochs repeated ``--rounds`` times after the whole-memory
  epoch): GB/s of dirty pages from the first to the last batch at the receiver's null-sink, and the
  same chain into ``null-sink`` without a network link (the same-run baseline).

Target (issue 10): the CurveZMQ sender chain >= 1.0 GB/s of dirty pages. Exit status 1 if missed,
2 if the corpus is missing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from pipeline.pipeline import Pipeline
from stages.bench.realmemory import find_corpus, read_trace
from stages.bench.sender import TimedNullSink, write_repeated_trace
from stages.classify import Classify
from stages.common.security import StreamKeys, link_security
from stages.entropy import Zstd
from stages.framer import Frame
from stages.rle import RunLengthEncode
from stages.transport import MESSAGE_BYTES, TraceSource, ZmqSink, ZmqSource
from stages.xor_delta import XorDelta

GB = 1e9
TARGET_GBPS = 1.0


def free_endpoint() -> str:
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        return f"tcp://127.0.0.1:{probe.bind_to_random_port('tcp://127.0.0.1')}"


def raw_gbps(keys: StreamKeys | None, seconds: float) -> float:
    """1 MiB messages PUSH -> PULL over tcp loopback for about ``seconds``; GB/s received."""
    endpoint = free_endpoint()
    server = link_security("bench", endpoint, True, **keys.receiver_source()) if keys else \
        link_security("bench", endpoint, True, insecure=True)
    client = link_security("bench", endpoint, False, **keys.sender_sink()) if keys else \
        link_security("bench", endpoint, False, insecure=True)
    receiving_context, sending_context = server.context(), client.context()
    pull, push = receiving_context.socket(zmq.PULL), sending_context.socket(zmq.PUSH)
    gatekeeper = server.apply(pull)
    client.apply(push)
    pull.bind(endpoint)
    push.connect(endpoint)
    message = np.random.default_rng(1).integers(0, 256, MESSAGE_BYTES, dtype=np.uint8).tobytes()
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            push.send(message, copy=False)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    pull.recv()                                   # connected and past the handshake
    received, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        received += len(pull.recv(copy=False))
    elapsed = time.perf_counter() - began
    stop.set()
    while sender.is_alive():
        pull.recv()
        sender.join(0.01)
    push.close(0)
    if gatekeeper is not None:
        gatekeeper.close()
    pull.close(0)
    sending_context.term()
    receiving_context.term()
    return received / elapsed / GB


def sender_chain_gbps(trace_file: Path, keys: StreamKeys | None) -> tuple[float, int]:
    """The sender chain, over CURVE tcp into zmq-src ! null-sink (``keys``) or into null-sink directly."""
    chain = [TraceSource(path=str(trace_file), preload=True), Classify(), XorDelta(cache="128MiB"),
             RunLengthEncode(), Zstd(), Frame()]
    if keys is None:
        result = Pipeline.chain(*chain, TimedNullSink()).run(mode="process", timeout=600)
        sender = receiver = result
    else:
        endpoint = free_endpoint()
        receiving = Pipeline.chain(ZmqSource(endpoint=endpoint, timeout="60s", **keys.receiver_source()),
                                   TimedNullSink())
        with receiving.start(mode="process") as handle:
            sender = Pipeline.chain(*chain, ZmqSink(endpoint=endpoint, **keys.sender_sink())).run(
                mode="process", timeout=600)
            receiver = handle.wait(timeout=120)
    stats = {stage: values for (stage, _), values in {**sender.statistics, **receiver.statistics}.items()}
    sink = stats["null-sink0"]["counters"]
    (source,) = [values for stage, values in stats.items() if stage.split("+")[0] == "trace-src0"]
    dirty = source["pages_out"] * 4096
    return dirty / (sink["last_batch"] - sink["first_batch"]) / GB, dirty


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench curve", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="times the recorded epochs repeat (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; medians reported")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each raw pyzmq pass (default 2)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    corpus = find_corpus()
    if corpus is None:
        print("curve benchmark: the memcached corpus is not available (PAGEPIPE_CORPUS)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pagepipe-bench-curve-") as scratch:
        keys = StreamKeys.create(Path(scratch) / "keys")
        plain = statistics.median(raw_gbps(None, args.seconds) for _ in range(args.repeats))
        curve = statistics.median(raw_gbps(keys, args.seconds) for _ in range(args.repeats))
        print(f"raw pyzmq, tcp loopback, 1 MiB messages: plain {plain:.2f} GB/s, CURVE {curve:.2f} GB/s "
              f"(CURVE / plain {curve / plain:.2f})")
        trace_file = write_repeated_trace(read_trace(corpus), args.rounds, Path(scratch))
        local, linked = [], []
        for _ in range(args.repeats):       # interleaved, so that a change of load hits both alike
            local.append(sender_chain_gbps(trace_file, None))
            linked.append(sender_chain_gbps(trace_file, keys))
    local_gbps = statistics.median(run[0] for run in local)
    linked_gbps = statistics.median(run[0] for run in linked)
    ratio = statistics.median(link[0] / plain[0] for link, plain in zip(linked, local))
    met = linked_gbps >= TARGET_GBPS
    print(f"sender chain, process mode, {local[0][1] / 1e6:.0f} MB of dirty pages: into null-sink "
          f"{local_gbps:.2f} GB/s (runs {', '.join(f'{run[0]:.2f}' for run in local)}); over CurveZMQ tcp into "
          f"zmq-src ! null-sink {linked_gbps:.2f} GB/s (runs {', '.join(f'{run[0]:.2f}' for run in linked)}); "
          f"linked / local, median of pairs {ratio:.2f}")
    print(f"CurveZMQ sender chain >= {TARGET_GBPS} GB/s of dirty pages: {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
