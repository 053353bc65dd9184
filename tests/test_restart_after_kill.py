"""Nothing outlives a killed receiver: SIGKILL `pagepipe launch` / `pagepipe stage` and restart on the same
endpoint at once (the short version of `pagepipe bench restart`, which times it against 1 s)."""
from __future__ import annotations

import pytest

from stages.bench.restart import run_campaign


@pytest.mark.parametrize("command", ["launch", "stage"])
def test_a_receiver_killed_with_sigkill_restarts_on_the_same_endpoint_at_once(command):
    runs = run_campaign(command, runs=3)
    assert [run.leftovers for run in runs] == [0, 0, 0], "processes of the killed command stayed alive"
    assert all(run.restarted for run in runs), "the restarted receiver could not bind its endpoint"
    assert all(run.port_free_seconds < 10 and run.processes_gone_seconds < 10 for run in runs)
