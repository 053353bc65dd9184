"""Another process's memory through /proc: its writable mappings, run state, and contents.

Contents are read with process_vm_readv (up to 1024 ranges and 1 GiB a call,
resuming after short reads); the pages the kernel refuses to read are listed
for the caller to judge, never silently taken for zeros.
"""
from __future__ import annotations

import ctypes
import errno
import os
import time

import numpy as np

from pipeline.errors import TrackerError

from stages.common.layout import Mapping

_IOV_MAX = 1024
MAX_CALL_BYTES = 1 << 30
"""Bytes one process_vm_readv call asks for: the kernel copies at most 2 GiB - 4 KiB a call (MAX_RW_COUNT) and
returns the short count without an error."""
_SPECIAL_MAPPINGS = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]")
_DEVICE_PREFIX = "/dev/"
_DELETED = " (deleted)"
_READABLE_DEVICES = ("/dev/shm/", "/dev/zero")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_ulong]


class ProcessGone(Exception):
    """The process has exited (or is a zombie); not an error for a tracker: its stream ends."""


def permission_hint(pid: int) -> str:
    """What a user can do when reading another process's memory is refused."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as file:
            scope = file.read().strip()
    except OSError:
        scope = ""
    hint = (f"run pagepipe as the user that owns pid {pid}, or as root, or give it CAP_SYS_PTRACE "
            f"(setcap cap_sys_ptrace+ep on the python binary)")
    if scope and scope != "0":
        hint += (f"; kernel.yama.ptrace_scope is {scope}: at 1 only a parent may read its child unless it "
                 "has CAP_SYS_PTRACE (sysctl kernel.yama.ptrace_scope=0 lifts that), at 2 only "
                 "CAP_SYS_PTRACE helps, at 3 nothing does")
    elif not scope:
        hint += "; where the Yama LSM is on, kernel.yama.ptrace_scope above 0 also restricts this"
    return hint


def writable_mappings(pid: int) -> list[Mapping]:
    """The process's writable mappings worth tracking (no vdso/vvar, no device memory)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.read().splitlines()
    except FileNotFoundError:
        raise ProcessGone(pid) from None
    except PermissionError as exc:
        raise TrackerError(f"cannot read the mappings of pid {pid}: {exc.strerror}; {permission_hint(pid)}") from None
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1][1] != "w":
            continue
        name = fields[5].removesuffix(_DELETED) if len(fields) == 6 else "[anon]"  # same mapping once unlinked
        if name in _SPECIAL_MAPPINGS or (name.startswith(_DEVICE_PREFIX) and not name.startswith(_READABLE_DEVICES)):
            continue
        low, high = (int(part, 16) for part in fields[0].split("-"))
        mappings.append(Mapping(name, low, high, int(fields[2], 16), fields[3], int(fields[4]), fields[1][3] == "s"))
    return mappings


def past_end_of_file(pid: int, mapping: Mapping, address: int, page_size: int) -> bool:
    """Whether ``address`` of a file mapping lies past the end of its file: no data there (the process itself
    gets SIGBUS), which is why the kernel refuses to read it. False when the size cannot be learnt."""
    if not mapping.inode:
        return False
    for path in (f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}", mapping.name):
        try:
            size = os.stat(path).st_size
        except (OSError, ValueError):
            continue
        data_end = mapping.start + max(0, size - mapping.offset)
        return address >= data_end + (-data_end) % page_size
    return False


def _state(stat_path: str) -> str:
    with open(stat_path, "rb") as stat:
        text = stat.read()
    return chr(text[text.rindex(b")") + 2])


def process_state(pid: int) -> str:
    """The run state letter of the process (of its main thread): R, S, T, Z, ..."""
    try:
        return _state(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None


def thread_states(pid: int) -> list[str]:
    """The run state letter of every thread of the process."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessGone(pid) from None
    states = []
    for task in tasks:
        try:
            states.append(_state(f"/proc/{pid}/task/{task}/stat"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited
    if not states:
        raise ProcessGone(pid)
    return states


def wait_stopped(pid: int, timeout: float) -> None:
    """Wait until every thread of ``pid`` is stopped; ProcessGone if it exits, TrackerError on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        states = thread_states(pid)
        if any(state in "ZX" for state in states):
            raise ProcessGone(pid)
        if all(state in "Tt" for state in states):
            return
        if time.perf_counter() > deadline:
            raise TrackerError(f"pid {pid} did not stop within {timeout} s (states {''.join(states)})")
        time.sleep(0)


def read_pages(pid: int, runs: list[tuple[int, int, int]], page_size: int, out: np.ndarray,
               max_call_bytes: int | None = None) -> list[int]:
    """Read runs of (address, npages, first row of ``out``) into the C-contiguous ``out``.

    Returns the addresses of the pages the kernel refused to read (left zero in
    ``out``; the caller decides what they mean). A short read is never taken
    for a refusal: process_vm_readv stops at 2 GiB - 4 KiB a call and at the
    first page it cannot read, so the read resumes where it stopped, and a
    page counts as refused only when a call starting on it reads nothing.
    ``max_call_bytes`` (default ``MAX_CALL_BYTES``) bounds the bytes one call asks for.
    """
    limit = MAX_CALL_BYTES if max_call_bytes is None else max_call_bytes
    if not runs:
        return []
    if not out.flags.c_contiguous:
        raise ValueError("read_pages needs a C-contiguous output array")
    table = np.array(runs, dtype=np.uint64).reshape(-1, 3)
    remote = table[:, 0].copy()
    length = table[:, 1] * np.uint64(page_size)
    local = table[:, 2] * np.uint64(page_size) + np.uint64(out.ctypes.data)
    if int(length.max()) > limit:  # rare: split the runs longer than one call may ask for
        remote, local, length = _split(remote, local, length, limit)
    iov = np.empty((_IOV_MAX, 2), dtype=np.uint64)
    remote_iov = np.empty((_IOV_MAX, 2), dtype=np.uint64)
    refused: list[int] = []
    index, count = 0, len(remote)
    while index < count:
        window = np.cumsum(length[index:index + _IOV_MAX])
        last = max(1, int(np.searchsorted(window, limit, side="right")))
        iov[:last, 0], iov[:last, 1] = local[index:index + last], length[index:index + last]
        remote_iov[:last, 0], remote_iov[:last, 1] = remote[index:index + last], length[index:index + last]
        done = _libc.process_vm_readv(pid, iov.ctypes.data, last, remote_iov.ctypes.data, last, 0)
        if done < 0:
            code = ctypes.get_errno()
            if code == errno.ESRCH:
                raise TrackerError(f"pid {pid} died during the checkpoint")
            if code in (errno.EPERM, errno.EACCES):
                raise TrackerError(f"cannot read the memory of pid {pid}: {os.strerror(code)}; {permission_hint(pid)}")
            if code != errno.EFAULT:
                raise TrackerError(f"cannot read the memory of pid {pid}: {os.strerror(code)}")
            done = 0
        if done == int(window[last - 1]):
            index += last
            continue
        if done:  # a short read: resume where it stopped
            full = int(np.searchsorted(window[:last], done, side="right"))
            index += full
            _consume(remote, local, length, index, done - (int(window[full - 1]) if full else 0))
            continue
        # nothing read: the page at remote[index] is refused
        page = int(remote[index]) - int(remote[index]) % page_size
        skip = min(int(length[index]), page + page_size - int(remote[index]))
        if not refused or refused[-1] != page:  # a split run can start inside a refused page
            refused.append(page)
        ctypes.memset(int(local[index]), 0, skip)
        _consume(remote, local, length, index, skip)
        index += not length[index]
    return refused


def _consume(remote: np.ndarray, local: np.ndarray, length: np.ndarray, index: int, nbytes: int) -> None:
    """Drop the first ``nbytes`` of run ``index``."""
    remote[index] += np.uint64(nbytes)
    local[index] += np.uint64(nbytes)
    length[index] -= np.uint64(nbytes)


def _split(remote: np.ndarray, local: np.ndarray, length: np.ndarray,
           limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same runs, each longer than ``limit`` bytes cut into pieces of at most ``limit``."""
    pieces = [(int(r) + offset, int(l) + offset, min(limit, int(n) - offset))
              for r, l, n in zip(remote, local, length) for offset in range(0, int(n), limit)]
    table = np.array(pieces, dtype=np.uint64)
    return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy()
