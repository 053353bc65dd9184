"""Another process's memory through /proc: its writable mappings, run state, and contents.

Contents are read with process_vm_readv (one call per 1024 ranges); a page
the kernel refuses to read (a file mapping past end of file, a guard hole) is
left zero and counted, so one odd mapping does not stop a checkpoint.
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
        mappings.append(Mapping(name, low, high))
    return mappings


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


def read_pages(pid: int, runs: list[tuple[int, int, int]], page_size: int, out: np.ndarray) -> int:
    """Read runs of (address, npages, first row of ``out``); returns the count of unreadable pages (zeroed)."""
    pending = list(runs)
    unreadable = 0
    while pending:
        chunk, pending = pending[:_IOV_MAX], pending[_IOV_MAX:]
        remote = np.array([(start, npages * page_size) for start, npages, _ in chunk], dtype=np.uint64)
        local = np.array([(out[row].ctypes.data, npages * page_size) for _, npages, row in chunk], dtype=np.uint64)
        done = _libc.process_vm_readv(pid, local.ctypes.data, len(chunk), remote.ctypes.data, len(chunk), 0)
        if done < 0:
            code = ctypes.get_errno()
            if code == errno.ESRCH:
                raise TrackerError(f"pid {pid} died during the checkpoint")
            if code in (errno.EPERM, errno.EACCES):
                raise TrackerError(f"cannot read the memory of pid {pid}: {os.strerror(code)}; {permission_hint(pid)}")
            if code != errno.EFAULT:
                raise TrackerError(f"cannot read the memory of pid {pid}: {os.strerror(code)}")
            done = 0
        requested = int(remote[:, 1].sum())
        if done == requested:
            continue
        # Skip the page that failed and read on from the next one.
        consumed = np.cumsum(remote[:, 1].astype(np.int64))
        index = int(np.searchsorted(consumed, done, side="right"))
        start, npages, row = chunk[index]
        failed_page = (done - (int(consumed[index - 1]) if index else 0)) // page_size
        out[row + failed_page] = 0
        unreadable += 1
        rest = [(start + (failed_page + 1) * page_size, npages - failed_page - 1, row + failed_page + 1)]
        pending = [item for item in rest if item[1] > 0] + chunk[index + 1:] + pending
    return unreadable

