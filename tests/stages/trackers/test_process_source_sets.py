"""process-src on sets of processes: a tree sharing memory, listed pids, a cgroup, sharers outside the set."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch import Flag
from pipeline.errors import ConfigError
from pipeline.pipeline import Pipeline
from pipeline.stage import StageContext
from stages.common.replica_store import load_replica, read_manifest, region_keys
from stages.trackers.procmem import thread_states
from stages.trackers.process import PAGE_SIZE, ProcessSource
from stages.trackers.targets import TargetSet
from tracker_streams import replay

SHARED_PAGES = 256

FAMILY = textwrap.dedent(f"""
    import ctypes, mmap, os, random, sys, time
    PAGE, PAGES = mmap.PAGESIZE, {SHARED_PAGES}
    shared = mmap.mmap(-1, PAGES * PAGE)      # MAP_SHARED anonymous memory, inherited by every child
    private = bytearray(64 * PAGE)            # copy-on-write after each fork
    path = f"/dev/shm/pagepipe-test-{{os.getpid()}}"  # POSIX shared memory, as shm_open makes it
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 16 * PAGE)
    posix = mmap.mmap(fd, 16 * PAGE)
    os.unlink(path)                           # the mappings stay; nothing left in /dev/shm
    os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    segment = libc.shmget(0, 16 * PAGE, 0o1600)  # SysV shared memory (IPC_PRIVATE, IPC_CREAT)
    sysv = (ctypes.c_char * (16 * PAGE)).from_address(libc.shmat(segment, None, 0))
    libc.shmctl(segment, 0, None)             # IPC_RMID: freed once the last process detaches

    def work(seed, seconds=None):
        rng = random.Random(seed)
        end = None if seconds is None else time.monotonic() + seconds
        while end is None or time.monotonic() < end:
            for _ in range(20):
                page = rng.randrange(PAGES)
                at = page * PAGE + 8 * rng.randrange(PAGE // 8)
                shared[at:at + 8] = rng.randbytes(8)
                private[rng.randrange(len(private))] = rng.randrange(256)
                posix[rng.randrange(16 * PAGE)] = rng.randrange(256)
                sysv[rng.randrange(16 * PAGE)] = rng.randrange(256)
            time.sleep(0.001)

    for seed in range(int(sys.argv[1])):
        if os.fork() == 0:
            work(seed)
            os._exit(0)
    print("ready", flush=True)
    rng = random.Random(99)
    while True:  # the parent writes too, and starts children that live a moment
        child = os.fork()
        if child == 0:
            work(rng.randrange(1000), 0.03)
            os._exit(0)
        work(rng.randrange(1000), 0.05)
        os.waitpid(child, 0)
""")


class Family:
    """A Python parent with ``children`` forked children, all writing one MAP_SHARED anonymous mapping."""

    def __init__(self, children: int = 3):
        self.process = subprocess.Popen([sys.executable, "-c", FAMILY, str(children)], stdout=subprocess.PIPE,
                                        text=True, start_new_session=True)
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.process.stdout.close()


@pytest.fixture
def family():
    family = Family()
    yield family
    family.stop()


def mappings_of(pid: int) -> list[tuple[int, int, int, str, int, bool]]:
    """(start, end, offset, device, inode, shared) of each writable mapping."""
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if fields[1][1] == "w":
                low, high = (int(x, 16) for x in fields[0].split("-"))
                found.append((low, high, int(fields[2], 16), fields[3], int(fields[4]), fields[1][3] == "s"))
    return found


def read_memory(pid: int, address: int, nbytes: int) -> np.ndarray:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return np.frombuffer(mem.read(nbytes), dtype=np.uint8)


SHARED_NAME = re.compile(r"^shared (\w+:\w+):(\d+)@0x([0-9a-f]+) ")


def assert_replica_equals_every_process(replica: Path, members: list[int]) -> dict[int, int]:
    """Every private region equals its process's memory; every shared region equals the memory of every
    member that maps that part of the object. Returns the shared pages compared in each process."""
    manifest = read_manifest(replica)
    memory = load_replica(replica)
    private_pids = set()
    shared_compared: dict[int, int] = {}
    for key, region in zip(region_keys(tuple(manifest["regions"])), manifest["regions"]):
        size = region["npages"] * PAGE_SIZE
        shared = SHARED_NAME.match(region["name"])
        if shared is None:
            pid = int(region["name"].split(":", 1)[0])
            private_pids.add(pid)
            np.testing.assert_array_equal(memory[key], read_memory(pid, region["start"], size),
                                          err_msg=f"region {key}")
            continue
        device, inode, offset = shared.group(1), int(shared.group(2)), int(shared.group(3), 16)
        for pid in members:
            for low, high, map_offset, map_device, map_inode, is_shared in mappings_of(pid):
                if not is_shared or (map_device, map_inode) != (device, inode):
                    continue
                first, last = max(offset, map_offset), min(offset + size, map_offset + high - low)
                if first < last:
                    live = read_memory(pid, low + first - map_offset, last - first)
                    np.testing.assert_array_equal(memory[key][first - offset:last - offset], live,
                                                  err_msg=f"region {key} in pid {pid}")
                    shared_compared[pid] = shared_compared.get(pid, 0) + (last - first) // PAGE_SIZE
    assert private_pids == set(members), "the layout names every process of the set"
    for pid in members:  # every page of every shared mapping of every process was compared
        mapped = sum(high - low for low, high, _, _, inode, shared in mappings_of(pid) if shared and inode)
        assert shared_compared.get(pid, 0) == mapped // PAGE_SIZE, f"pid {pid}"
    return shared_compared


def test_a_process_tree_sharing_memory_replicates_to_every_processs_memory(family, tmp_path):
    stream, replica = tmp_path / "stream", tmp_path / "replica"
    result = Pipeline.parse(f"process-src name=src pid={family.process.pid} tree=true interval=20ms checkpoints=10 "
                            f"stop-at-end=true ! frame ! file-sink path={stream}").run(mode="inline", timeout=120)
    Pipeline.parse(f"file-src path={stream} ! deframe ! decode ! replica-sink path={replica} fsync=false").run(
        mode="inline", timeout=120)
    members = TargetSet([family.process.pid], tree=True).members()
    assert len(members) >= 4 and all(set(thread_states(pid)) <= set("T") for pid in members), "stopped at the end"
    assert read_manifest(replica)["epoch"] == 10
    shared_compared = assert_replica_equals_every_process(replica, members)
    assert sum(count >= SHARED_PAGES + 32 for count in shared_compared.values()) >= 4, shared_compared
    stats = result.statistics[("src", 0)]["counters"]
    assert stats["processes"] >= 4 and 0 < stats["stopped_fraction"] < 1


def test_each_shared_object_is_sent_once_and_processes_are_followed(family):
    source = ProcessSource(pid=family.process.pid, tree=True, interval=0.02, checkpoints=12)
    seen_pids: set[int] = set()
    with_source = []
    source.start(StageContext("process-src"))
    try:
        for batch in source.produce():
            with_source.append(batch)
            if batch.flags & Flag.LAYOUT:
                seen_pids.update(batch.meta["pids"])
                shared = [r for r in batch.meta["regions"] if r["name"].startswith("shared ")]
                for kind, npages in (("/dev/zero", SHARED_PAGES), ("/dev/shm/", 16), ("/SYSV", 16)):
                    pages = sum(r["npages"] for r in shared if kind in r["name"])
                    assert pages == npages, f"the {kind} mapping every process shares is tracked once"
    finally:
        source.stop()
    replay(with_source)
    assert len(seen_pids) > 4, "children that started during the run joined the set"


def test_listed_pids_are_checkpointed_together(family):
    children = [pid for pid in TargetSet([family.process.pid], tree=True).members() if pid != family.process.pid]
    listed = children[:2]
    source = ProcessSource(pids=",".join(map(str, listed)), interval=0, checkpoints=2)
    with_source = []
    source.start(StageContext("process-src"))
    try:
        with_source = list(source.produce())
    finally:
        source.stop()
    names = [r["name"] for r in with_source[0].meta["regions"]]
    assert {int(name.split(":", 1)[0]) for name in names if not name.startswith("shared ")} == set(listed)
    assert with_source[0].meta["pids"] == sorted(listed)


def test_a_process_outside_the_set_mapping_its_shared_memory_is_named_in_a_warning(family):
    child = next(pid for pid in TargetSet([family.process.pid], tree=True).members() if pid != family.process.pid)
    warnings = []
    source = ProcessSource(pid=child, interval=0, checkpoints=2)
    source.start(StageContext("process-src", post=lambda kind, **f: warnings.append(f.get("message", ""))))
    try:
        list(source.produce())
    finally:
        source.stop()
    assert any(f"pid {family.process.pid} is not checkpointed but maps /dev/zero" in w for w in warnings), warnings


def test_a_cgroups_processes_are_checkpointed(family, tmp_path):
    root = Path("/sys/fs/cgroup/unified")
    if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup2 hierarchy here")
    group = root / f"pagepipe-test-{os.getpid()}"
    group.mkdir()
    members = TargetSet([family.process.pid], tree=True).members()[:3]
    try:
        try:
            for pid in members:
                (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            pytest.skip(f"cannot move processes into a cgroup here: {exc}")
        source = ProcessSource(cgroup=str(group), interval=0, checkpoints=2)
        source.start(StageContext("process-src"))
        try:
            batches = list(source.produce())
        finally:
            source.stop()
        in_group = {int(p) for p in (group / "cgroup.procs").read_text().split()}
        checkpointed = set(batches[0].meta["pids"])
        # a short-lived child of the family checkpointed at epoch 1 may have exited since (it left no other way)
        assert all(pid in in_group or not os.path.exists(f"/proc/{pid}") for pid in checkpointed), (
            checkpointed, in_group)
        assert checkpointed & set(members)
    finally:
        for pid in map(int, (group / "cgroup.procs").read_text().split()):
            try:
                (root / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.mark.parametrize("properties, message", [
    ({}, "exactly one of pid=, pids= and cgroup="),
    ({"pid": 1, "pids": "2,3"}, "exactly one of"),
    ({"cgroup": "x", "tree": True}, "tree=true goes with pid="),
    ({"pids": "1,x"}, "process ids separated by commas"),
])
def test_a_process_set_given_wrongly_is_a_clear_error(properties, message):
    with pytest.raises(ConfigError, match=message):
        ProcessSource(**properties).start(StageContext("process-src"))
