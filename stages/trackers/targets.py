"""Which processes process-src checkpoints together: listed pids, their process trees, or a cgroup.

The set is looked up again at every checkpoint (while the processes found so
far are stopped, so a fork in progress is caught), following processes that
start and exit. ``outside_sharers`` finds the processes outside the set that
map the set's writable shared memory: their writes land in the replica at
whatever moment the copy happens to read them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from pipeline.errors import ConfigError, TrackerError

from stages.common.layout import Mapping

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(b")") + 2:].decode().split()


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in "ZX"


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class TargetSet:
    """The processes to checkpoint: ``pids`` (with every descendant if ``tree``), or those of ``cgroup``."""

    def __init__(self, pids: Iterable[int] = (), tree: bool = False, cgroup: str = ""):
        self.roots = sorted(set(pids))
        self.tree = tree
        self.cgroup = Path(cgroup) if cgroup else None
        if self.cgroup is not None and not self.cgroup.is_absolute():
            self.cgroup = CGROUP_ROOT / self.cgroup
        if bool(self.roots) == bool(self.cgroup):
            raise ConfigError("give the processes either as pid=/pids= or as cgroup=, not both or neither")
        self._not_descendants: set[int] = set()
        """Pids seen outside the tree: a process never becomes a descendant later (orphans move up the tree,
        not into it), so only new pids need reading (a pid reused within a session is the rare exception)."""
        self._descendants: set[int] = set()
        """Descendants found so far: they stay members while they live, also once orphaned."""

    def describe(self) -> str:
        if self.cgroup is not None:
            return f"cgroup {self.cgroup}"
        what = "pid" if len(self.roots) == 1 else "pids"
        return f"{what} {','.join(map(str, self.roots))}" + (" and descendants" if self.tree else "")

    def members(self) -> list[int]:
        """The live processes of the set now, ascending."""
        if self.cgroup is not None:
            return self._cgroup_members(self.cgroup)
        found = [pid for pid in self.roots if alive(pid)]
        if not self.tree:
            return found
        return self._with_descendants(found)

    @staticmethod
    def _cgroup_members(cgroup: Path) -> list[int]:
        try:
            text = (cgroup / "cgroup.procs").read_text()
        except FileNotFoundError:
            raise TrackerError(f"cgroup {cgroup}: no such cgroup (no cgroup.procs there)") from None
        except OSError as exc:
            raise TrackerError(f"cgroup {cgroup}: cannot list its processes: {exc.strerror}") from None
        return sorted(pid for pid in map(int, text.split()) if alive(pid))

    def _with_descendants(self, roots: list[int]) -> list[int]:
        members = set(roots) | {pid for pid in self._descendants if alive(pid)}
        parents: dict[int, int] = {}
        for pid in _all_pids():
            if pid in members or pid in self._not_descendants:
                continue
            fields = _stat_fields(pid)
            if fields is not None and fields[0] not in "ZX":
                parents[pid] = int(fields[1])
        grew = True
        while grew:
            grew = False
            for pid, parent in list(parents.items()):
                if parent in members:
                    members.add(pid)
                    del parents[pid]
                    grew = True
        self._not_descendants.update(parents)
        self._descendants = members - set(self.roots)
        return sorted(members)


def shared_objects(mappings: Iterable[Mapping]) -> set[tuple[str, int, str]]:
    """(device, inode, name) of the writable shared mappings among ``mappings`` (the name keeps SysV segments,
    whose inode is their id, apart from MAP_SHARED anonymous memory on the same device)."""
    return {(m.device, m.inode, m.name) for m in mappings if m.shared and m.inode}


def outside_sharers(members: Iterable[int], objects: set[tuple[str, int, str]]) -> dict[int, set[str]]:
    """Processes outside ``members`` that map any of ``objects`` writable and shared: pid -> mapping names."""
    inside = set(members)
    found: dict[int, set[str]] = {}
    if not objects:
        return found
    for pid in _all_pids():
        if pid in inside:
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                lines = maps.read().splitlines()
        except OSError:
            continue  # gone, or not ours to read
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1][1] == "w" and fields[1][3] == "s":
                name = fields[5].removesuffix(" (deleted)")
                if (fields[3], int(fields[4]), name) in objects:
                    found.setdefault(pid, set()).add(name)
    return found
