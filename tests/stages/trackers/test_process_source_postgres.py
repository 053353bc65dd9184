"""process-src on a real multi-process server: a live postgres tree under pgbench load, every process stopped
together, replicates exactly (each process's private memory and the shared memory they all map)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.pipeline import Pipeline
from stages.trackers.procmem import thread_states
from stages.trackers.targets import TargetSet
from test_process_source_sets import assert_replica_equals_every_process


def _postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin holding initdb, postgres, pgbench and pg_isready (Debian's
    layout)."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "postgres", "pgbench", "pg_isready")):
            return Path(folder)
    return None


def _server_user() -> str | None:
    """postgres refuses to run as root: as root, the 'postgres' account (Debian's package makes it)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' account to run the server as")


BIN = _postgres_bin()
pytestmark = pytest.mark.skipif(
    BIN is None, reason="postgres binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql; "
                        ".ci/run does)")


class Postgres:
    """A throw-away cluster on a unix socket in a temporary folder, its postmaster and pgbench load."""

    def __init__(self) -> None:
        assert BIN is not None
        self.user = _server_user()
        self.folder = Path(tempfile.mkdtemp(prefix="pagepipe-pg-"))
        self.port = 5432 + os.getpid() % 20000
        self.server: subprocess.Popen | None = None
        self.load: subprocess.Popen | None = None
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(self.folder, account.pw_uid, account.pw_gid)

    def start(self) -> None:
        """initdb, the postmaster on a socket in the folder, pgbench's tables, then pgbench's load."""
        assert BIN is not None
        self._as_server([BIN / "initdb", "-D", self.folder / "data", "-A", "trust", "-U", "postgres", "-N",
                         "-E", "UTF8", "--locale=C"])
        self.server = subprocess.Popen(
            [BIN / "postgres", "-D", self.folder / "data", "-k", self.folder, "-p", str(self.port),
             "-c", "listen_addresses=", "-c", "shared_buffers=32MB", "-c", "max_connections=20", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        self._client("-i", "-s", "1", "-q")
        self.load = subprocess.Popen([BIN / "pgbench", *self._connection(), "-c", "4", "-j", "2", "-T", "300"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def _connection(self) -> list[str]:
        return ["-h", str(self.folder), "-p", str(self.port), "-U", "postgres", "postgres"]

    def _as_server(self, command: list) -> None:
        subprocess.run(command, user=self.user, check=True, capture_output=True, timeout=120)

    def _client(self, *arguments: str) -> None:
        subprocess.run([BIN / "pgbench", *arguments, *self._connection()], check=True, capture_output=True,
                       timeout=120)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while subprocess.run([BIN / "pg_isready", "-q", "-h", str(self.folder), "-p", str(self.port)]).returncode:
            assert self.server is not None
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start (exit status {self.server.poll()})")
            time.sleep(0.1)

    def close(self) -> None:
        """pgbench killed; every process of the tree continued (a test may leave them stopped), the postmaster
        asked for an immediate shutdown (it removes its shared memory), killed after 20 s; the folder removed."""
        if self.load is not None:
            os.killpg(self.load.pid, signal.SIGKILL)
            self.load.wait()
        if self.server is not None and self.server.poll() is None:
            for pid in TargetSet([self.server.pid], tree=True).members():
                os.kill(pid, signal.SIGCONT)
            self.server.send_signal(signal.SIGQUIT)
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:  # each backend is a session leader of its own: kill every one
                for pid in TargetSet([self.server.pid], tree=True).members():
                    os.kill(pid, signal.SIGKILL)
                self.server.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def postgres():
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_a_postgres_tree_under_pgbench_replicates_every_processs_memory(postgres, tmp_path):
    time.sleep(1)  # pgbench's clients connected and writing
    stream, replica = tmp_path / "stream", tmp_path / "replica"
    result = Pipeline.parse(
        f"process-src name=src pid={postgres.pid} tree=true mode=uffd interval=50ms checkpoints=30 stop-at-end=true "
        f"! classify ! xor-delta ! rle ! zstd ! frame ! file-sink path={stream}").run(mode="inline", timeout=180)
    members = TargetSet([postgres.pid], tree=True).members()
    assert len(members) >= 8, "postmaster, its helpers and pgbench's four backends"
    assert all(set(thread_states(pid)) <= set("T") for pid in members), "all stopped at the end"
    Pipeline.parse(f"file-src path={stream} ! deframe ! decode ! replica-sink path={replica} fsync=false").run(
        mode="inline", timeout=180)
    shared = assert_replica_equals_every_process(replica, members)
    assert min(shared.values()) * 4096 >= 32 << 20, f"the shared buffers compared in every process: {shared}"
    stats = result.statistics[("src", 0)]["counters"]
    assert stats["processes"] >= 8 and stats["written_pages"] > 0
    assert stats["checkpoint_pages"] > 0, "pgbench kept writing up to the final checkpoint"
