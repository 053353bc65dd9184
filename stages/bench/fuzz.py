"""``pagepipe bench fuzz``: the fuzzing and fault suite of issue 10.

- **wire**: ``--runs N`` mutated streams (natural and checksum-forged) through deframe + decode +
  replica-sink (``stages.bench.fuzz_wire``). Target: >= 100,000 streams, 0 violations.
- **codecs**: ``--codec-runs M`` (default 10 x N) mutated payloads of every chain, decoded between
  guard pages and checked against reference decoders (``stages.bench.fuzz_codecs``). Target:
  >= 1,000,000 payloads, 0 violations.
- **attacks**: the peer-attack cases (``stages.bench.fuzz_attacks``), each in its own process.
  Targets: only CorruptData, 0 attacker epochs committed, RSS < 64 MiB above idle.
- **lock**: ``--lock-trials T`` times two receivers on one replica (``stages.bench.fuzz_lock``).
  Target: 20 of 20 refused.

Work is spread over ``--jobs`` processes (default: every CPU). Exit status 1 if anything was
violated. The receiver-kill campaign lives in the end-to-end tests and ``pagepipe bench`` of the
receiver work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from stages.bench.fuzz_attacks import CASES
from stages.bench.fuzz_codecs import CodecTally, fuzz_codecs
from stages.bench.fuzz_lock import lock_trials
from stages.bench.fuzz_wire import WireTally, fuzz_wire

WIRE_TARGET = 100_000
CODEC_TARGET = 1_000_000
RSS_TARGET_MIB = 64
LOCK_TARGET = 20
_WIRE_CHUNK = 250
_CODEC_CHUNK = 10_000


def _work_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _wire_task(args: tuple[int, int, str]) -> WireTally:
    runs, seed, directory = args
    return fuzz_wire(runs, seed, Path(directory))


def _codec_task(args: tuple[int, int]) -> CodecTally:
    return fuzz_codecs(*args)


def _chunks(total: int, size: int, seed: int) -> list[tuple[int, int]]:
    return [(min(size, total - start), seed + index) for index, start in enumerate(range(0, total, size))]


def _verdict(ok: bool, ran: int, target: int) -> str:
    if not ok:
        return "MISSED"
    return "met" if ran >= target else f"0 violations, but {ran:,} of the {target:,} the target asks"


def run_wire(runs: int, seed: int, jobs: int) -> tuple[WireTally, float]:
    tally = WireTally()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=_work_directory()) as directory, ProcessPoolExecutor(jobs) as pool:
        for part in pool.map(_wire_task, [(n, s, directory) for n, s in _chunks(runs, _WIRE_CHUNK, seed)]):
            tally.add(part)
    return tally, time.perf_counter() - started


def run_codecs(runs: int, seed: int, jobs: int) -> tuple[CodecTally, float]:
    tally = CodecTally()
    started = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        for part in pool.map(_codec_task, _chunks(runs, _CODEC_CHUNK, seed)):
            tally.add(part)
    return tally, time.perf_counter() - started


def run_attacks() -> list[dict]:
    results = []
    for name in CASES:
        done = subprocess.run([sys.executable, "-m", "stages.bench.fuzz_attacks", name], capture_output=True,
                              text=True, timeout=600)
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"case": name, "error": f"the case process failed: {done.stderr.strip()[-300:]}",
                      "error_ok": False, "rss_above_idle_mib": float("nan"), "attacker_epochs_committed": -1}
        result["ok"] = bool(result["error_ok"] and result["attacker_epochs_committed"] == 0
                            and result["rss_above_idle_mib"] < RSS_TARGET_MIB and not result.get("image_grew"))
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="wire streams (target 100000)")
    parser.add_argument("--codec-runs", type=int, default=None, help="codec payloads (default 10 x --runs)")
    parser.add_argument("--lock-trials", type=int, default=LOCK_TARGET, help="two-receiver trials (target 20)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["wire", "codecs", "attacks", "lock"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    codec_runs = args.codec_runs if args.codec_runs is not None else 10 * args.runs
    report: dict = {"jobs": args.jobs}
    failed = False

    if "wire" not in args.skip:
        wire, seconds = run_wire(args.runs, args.seed, args.jobs)
        report["wire"] = {"streams": wire.streams, "natural": wire.natural, "forged": wire.forged,
                          "refused": wire.refused, "epochs_committed": wire.committed, "seconds": round(seconds, 1),
                          "violations": len(wire.violations), "examples": wire.violations[:10]}
        print(f"wire: {wire.streams:,} streams ({wire.natural:,} natural, {wire.forged:,} forged, "
              f"{wire.refused:,} refused as CorruptData, {wire.committed:,} epochs committed) in {seconds:.1f} s "
              f"on {args.jobs} processes: {len(wire.violations)} violations -> "
              f"{_verdict(not wire.violations, wire.streams, WIRE_TARGET)}")
        for violation in wire.violations[:10]:
            print(f"  {violation}")
        failed |= bool(wire.violations)

    if "codecs" not in args.skip:
        codecs, seconds = run_codecs(codec_runs, args.seed + 10_000, args.jobs)
        report["codecs"] = {"payloads": codecs.cases, "accepted": codecs.accepted, "rejected": codecs.rejected,
                            "seconds": round(seconds, 1), "violations": len(codecs.violations),
                            "examples": codecs.violations[:10]}
        print(f"codecs: {codecs.cases:,} payloads ({codecs.accepted:,} decoded, {codecs.rejected:,} rejected) in "
              f"{seconds:.1f} s: {len(codecs.violations)} violations -> "
              f"{_verdict(not codecs.violations, codecs.cases, CODEC_TARGET)}")
        for violation in codecs.violations[:10]:
            print(f"  {violation}")
        failed |= bool(codecs.violations)

    if "attacks" not in args.skip:
        attacks = run_attacks()
        report["attacks"] = attacks
        print(f"peer attacks (receiver RSS above idle, target < {RSS_TARGET_MIB} MiB; attacker epochs committed):")
        for result in attacks:
            print(f"  {result['case']:<14} {result['rss_above_idle_mib']:>6} MiB  "
                  f"committed {result['attacker_epochs_committed']}  refused {result.get('epochs_refused', 0)}  "
                  f"{result['error'] or 'no error (epoch held or refused)'}"[:160]
                  + f"  -> {'met' if result['ok'] else 'MISSED'}")
        failed |= not all(result["ok"] for result in attacks)

    if "lock" not in args.skip and args.lock_trials:
        started = time.perf_counter()
        lock = lock_trials(args.lock_trials)
        report["lock"] = {"trials": lock.trials, "refused": lock.refused, "failures": lock.failures[:10],
                          "seconds": round(time.perf_counter() - started, 1)}
        ok = lock.refused == lock.trials
        print(f"two receivers on one replica: {lock.refused} of {lock.trials} refused -> "
              f"{_verdict(ok, lock.trials, LOCK_TARGET)}")
        for failure in lock.failures[:10]:
            print(f"  {failure}")
        failed |= not ok

    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
