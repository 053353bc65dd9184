"""Every bad command line a user can type gets one line naming the word at fault: exit 2 for a
configuration error, 1 for a failure while running; never a traceback (issue 13's table and more)."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.apps.demo import free_tcp_endpoint

PAGEPIPE = str(Path(sys.executable).with_name("pagepipe"))
CONFIG, RUNTIME = 2, 1


def bad_command_lines(tmp: Path) -> list[tuple[list[str], int, str]]:
    """(arguments, exit code, a word the message must name)."""
    crowded = tmp / "crowded"
    crowded.mkdir()
    (crowded / "thesis.tex").write_text("my thesis")
    a_file = tmp / "a-file"
    a_file.write_text("not a replica")
    not_json = tmp / "notes.txt"
    not_json.write_text("plain text")
    plain_dir = tmp / "plain-dir"
    plain_dir.mkdir()
    (plain_dir / "x").write_text("x")
    closed = free_tcp_endpoint()
    return [
        # the table
        (["launch", "process-src ! null-sink"], CONFIG, "pid="),
        (["launch", "test-src ! frame ! file-sink"], CONFIG, "path="),
        (["launch", "test-src ! frame ! zmq-sink"], CONFIG, "endpoint="),
        (["launch", "zmq-src ! null-sink"], CONFIG, "endpoint="),
        (["launch", "test-src ! frame ! deframe ! decode ! replica-sink"], CONFIG, "path="),
        (["launch", f"process-src pid={os.getpid()} interval=25 ! null-sink"], CONFIG, "'25' has no unit"),
        (["launch", f"process-src pid={os.getpid()} interval=25 parsec ! null-sink"], CONFIG, "parsec"),
        (["launch", "test-src ! frame ! zmq-sink endpoint=127.0.0.1:5999"], CONFIG, "127.0.0.1:5999"),
        (["launch", "--timeout", "1s", f"zmq-src endpoint={closed} insecure=true ! null-sink"], RUNTIME, "--timeout"),
        (["launch", f"zmq-src endpoint={closed} ! null-sink"], CONFIG, "insecure=true"),
        (["launch", f"test-src ! frame ! deframe ! decode ! replica-sink path={crowded}"], CONFIG, "force=true"),
        (["replica", "verify", str(tmp / "missing")], RUNTIME, "no such directory"),
        (["replica", "verify", str(a_file)], RUNTIME, "a file"),
        (["replica", "verify", str(plain_dir)], RUNTIME, "not a replica"),
        # launch strings
        (["launch", ""], CONFIG, "empty pipeline"),
        (["launch", "nosuch ! null-sink"], CONFIG, "nosuch"),
        (["launch", "test-src epochs=abc ! null-sink"], CONFIG, "abc"),
        (["launch", "test-src epochs=-1 ! null-sink"], CONFIG, "epochs"),
        (["launch", "test-src ! ! null-sink"], CONFIG, "'!'"),
        (["launch", "test-src !"], CONFIG, "'!'"),
        (["launch", 'test-src name="abc ! null-sink'], CONFIG, "quote"),
        (["launch", "test-src colour=red ! null-sink"], CONFIG, "colour"),
        (["launch", "test-src ! rle ! null-sink"], CONFIG, "rle"),
        (["launch", "test-src ! identity workers=0 ! null-sink"], CONFIG, "workers"),
        (["launch", "test-src ! identity workers=100 ! null-sink"], CONFIG, "workers"),
        (["launch", "test-src"], CONFIG, "null-sink"),
        (["launch", "null-sink"], CONFIG, "upstream"),
        (["launch", "test-src pattern=plaid ! null-sink"], CONFIG, "plaid"),
        (["launch", "test-src name=a ! null-sink name=a"], CONFIG, "'a'"),
        (["launch", "test-src ! null-sink  nowhere. ! null-sink"], CONFIG, "nowhere"),
        (["launch", "process-src pid=abc ! null-sink"], CONFIG, "abc"),
        (["launch", "test-src ! frame ! zmq-sink endpoint=tcp://127.0.0.1:99999"], CONFIG, "99999"),
        (["launch", "test-src ! frame ! zmq-sink endpoint=carrier-pigeon://home"], CONFIG, "carrier-pigeon"),
        (["launch", "test-src ! frame ! zmq-sink endpoint=tcp://localhost"], CONFIG, "tcp://localhost"),
        (["launch", "zmq-src endpoint=tcp://*:1 timeout=soon ! null-sink"], CONFIG, "soon"),
        (["launch", "test-src ! frame ! deframe ! decode ! replica-sink path=r ack-endpoint=localhost:5556"],
         CONFIG, "localhost:5556"),
        # launch options
        (["launch", "--mode", "bogus", "test-src ! null-sink"], CONFIG, "bogus"),
        (["launch", "--max-inflight", "12parsecs", "test-src ! null-sink"], CONFIG, "12parsecs"),
        (["launch", "--max-inflight", "0", "test-src ! null-sink"], CONFIG, "--max-inflight"),
        (["launch", "--timeout", "abc", "test-src ! null-sink"], CONFIG, "abc"),
        (["launch", "--timeout", "-1", "test-src ! null-sink"], CONFIG, "--timeout"),
        (["launch", "--stats-json", str(tmp / "no" / "dir" / "x.json"), "test-src ! null-sink"], CONFIG,
         "--stats-json"),
        (["launch", "--stats-json", str(tmp), "test-src ! null-sink"], CONFIG, "directory"),
        (["launch", "--stats-interval", "0", "test-src ! null-sink"], CONFIG, "--stats-interval"),
        (["launch", "--metrics-port", "http", "test-src ! null-sink"], CONFIG, "--metrics-port"),
        (["launch", "--log-format", "xml", "test-src ! null-sink"], CONFIG, "xml"),
        # runtime failures named by their stage and cause
        (["launch", f"file-src path={tmp / ':x:[bold]gone[/bold]'} ! deframe ! null-sink"], RUNTIME,
         ":x:[bold]gone[/bold]"),        # text from data is never markup or emoji
        (["launch", f"file-src path={tmp / 'missing.trace'} ! deframe ! null-sink"], RUNTIME, "missing.trace"),
        (["launch", f"trace-src path={not_json} ! null-sink"], RUNTIME, "trace-src"),
        (["launch", "process-src pid=999999999 ! null-sink"], RUNTIME, "999999999"),
        # other subcommands
        (["inspect", "nosuch"], CONFIG, "nosuch"),
        (["stage"], CONFIG, "element"),
        (["stage", "identity"], CONFIG, "--input"),
        (["stage", "test-src", "--input", "tcp://127.0.0.1:5"], CONFIG, "--input"),
        (["stage", "identity", "--input", "127.0.0.1:5", "--output", "tcp://127.0.0.1:6"], CONFIG, "127.0.0.1:5"),
        (["stage", "identity", "--input", "tcp://127.0.0.1:5", "--output", "tcp://127.0.0.1:6", "--worker", "3",
          "--workers", "2"], CONFIG, "--worker"),
        (["stage", "test-src ! null-sink"], CONFIG, "one element"),
        (["stage", "zmq-src", "--output", f"ipc://{tmp}/out"], CONFIG, "endpoint="),
        (["stage", "identity", "--input", "tcp://127.0.0.1:5", "--output", "tcp://127.0.0.1:6"], CONFIG, "--insecure"),
        (["bench", "nosuch"], CONFIG, "nosuch"),
        (["bench", "../etc"], CONFIG, "../etc"),
        (["report", str(tmp / "missing.json"), "-o", str(tmp / "r.png")], CONFIG, "missing.json"),
        (["report", str(not_json), "-o", str(tmp / "r.png")], CONFIG, "notes.txt"),
        (["report", str(not_json), "-o", str(tmp / "r.pdf")], CONFIG, "r.pdf"),
        (["report", str(not_json)], CONFIG, "-o"),
        (["replica"], CONFIG, "action"),
        (["demo", "--size", "huge"], CONFIG, "huge"),
        (["demo", "--seconds", "0"], CONFIG, "seconds"),
        (["demo", "--codec", "morse"], CONFIG, "morse"),
        (["demo", "--workload", "chess", "--seconds", "1s"], CONFIG, "chess"),
        (["demo", "--max-unacked", "lots"], CONFIG, "lots"),
        (["nosuch"], CONFIG, "nosuch"),
    ]


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PAGEPIPE, *arguments], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_at_least_forty_bad_command_lines_answer_in_one_line_without_a_traceback(tmp_path):
    cases = bad_command_lines(tmp_path)
    assert len(cases) >= 40
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, [arguments for arguments, _, _ in cases]))
    wrong = []
    for (arguments, code, word), result in zip(cases, results):
        said = result.stdout + result.stderr
        message = result.stderr.strip().splitlines()[0] if result.stderr.strip() else ""  # not the echoed line
        if "Traceback" in said or "unexpected" in said or result.returncode != code or word not in message:
            wrong.append(f"pagepipe {' '.join(arguments)!r}: exit {result.returncode} (want {code}), "
                         f"want {word!r} in: {said.strip()[-600:]}")
    assert not wrong, f"{len(wrong)} of {len(cases)}:\n\n" + "\n\n".join(wrong)
