"""process-src on another user's process: the error says what would let it read that memory."""
from __future__ import annotations

import os

import pytest

from pipeline.errors import TrackerError
from pipeline.stage import StageContext
from stages.trackers.process import ProcessSource

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_process_is_refused_with_what_to_do():
    target = os.getpid()                     # a root process, seen from a child running as nobody
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:                           # the child: become nobody, try to track the root process
        message = b"no error"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            ProcessSource(pid=target).start(StageContext("process-src0"))
        except TrackerError as exc:
            message = str(exc).encode()
        except BaseException as exc:          # anything else is the test's failure, reported to the parent
            message = repr(exc).encode()
        finally:
            os.write(write_end, message)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    assert f"pid {target}" in message and "Permission denied" in message
    for advice in ("the user that owns", "as root", "CAP_SYS_PTRACE", "ptrace_scope"):
        assert advice in message, message
