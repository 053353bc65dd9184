"""What the trackers and the replica-sink record per epoch (pipeline.epoch_stats), from real runs."""
from __future__ import annotations

from pipeline import Pipeline
from pipeline.bus import Message
from stages.apps.demo import DemoOptions, run_demo


def test_tracker_and_replica_record_pause_dirty_pages_ratio_and_commit_latency(tmp_path):
    result = Pipeline.parse(
        "workload-src kind=kv size=2MiB seconds=1s rate=40 ! classify ! xor-delta ! rle ! zstd ! frame ! "
        f"deframe ! decode ! replica-sink path={tmp_path / 'replica'} fsync=false").run(mode="inline", timeout=120)
    epochs = result.epochs.pipeline()
    assert len(epochs) >= 10
    for epoch, values in epochs.items():
        assert values["pause_seconds"] > 0 and values["dirty_bytes"] == values["dirty_pages"] * 4096
        assert values["applied_bytes"] == values["dirty_bytes"], epoch   # every checkpoint committed
        assert 0 <= values["commit_latency_seconds"] < 60
        assert values["wire_bytes"] > 0 and values["ratio"] == values["dirty_bytes"] / values["wire_bytes"]
    first = min(epochs)
    assert epochs[first]["dirty_pages"] == 512                              # the full first copy
    assert sum(values["ratio"] > 2 for values in epochs.values()) > len(epochs) // 2   # kv updates compress
    assert result.totals("workload-src0")["pages_out"] == sum(v["dirty_pages"] for v in epochs.values())


def test_region_tracker_records_checkpoint_to_ack_latency(tmp_path):
    messages: list[Message] = []
    result = run_demo(DemoOptions(size=2 << 20, seconds=1.0, replica=str(tmp_path / "replica")),
                      show_progress=False, on_message=messages.append)
    assert result.identical
    latencies = [values["ack_latency_seconds"] for message in messages if message.kind == "epochs"
                 for _, values in message.fields["records"] if "ack_latency_seconds" in values]
    assert len(latencies) >= result.epochs // 2 and all(0 < latency < 60 for latency in latencies)
