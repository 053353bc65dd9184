"""Helpers shared by the runtime tests."""
from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import time
from pathlib import Path


def caret_column(message: str) -> int:
    """Column of the caret in an error message, relative to the quoted description line above it."""
    lines = message.splitlines()
    return lines[-1].index("^") - lines[-2].index(lines[-2].strip())


LEFTOVER_WAIT = 5.0


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(root: int) -> set[int]:
    """Living (non-zombie) processes below ``root``."""
    parents = parent_pids()
    found, frontier = set(), [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found.update(children)
        frontier.extend(children)
    return found


def multiprocessing_helpers() -> set[int]:
    """The forkserver and resource tracker: long-lived helpers of multiprocessing, not workers."""
    helpers = {getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
               getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)}
    return {pid for pid in helpers if pid}


def wait_until_gone(pids: set[int], timeout: float = LEFTOVER_WAIT) -> set[int]:
    """The pids among ``pids`` still alive (non-zombie) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = pids & set(parent_pids())
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def worker_processes() -> set[int]:
    return descendants(os.getpid()) - multiprocessing_helpers()
