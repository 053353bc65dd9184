"""Cutting one channel's connection at random moments never leaves a partially committed epoch in the replica."""
import json

from stages.bench import channels


def test_cut_channels_commit_no_partial_epoch(tmp_path):
    out = tmp_path / "channels.json"
    status = channels.main(["--kills", "6", "--channels", "3", "--epochs", "30", "--pages", "256",
                            "--window", "0.8", "--seed", "11", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert status == 0 and figures["partial_epochs_committed"] == 0 and figures["rounds"] == 6
    failures = [r["failure"] for r in figures["rounds_detail"] if not r["completed"]]
    assert all("zmq-src0" in failure for failure in failures)  # the receiver noticed the loss, not a bystander
