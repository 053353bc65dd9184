"""Running pipelines: the same output inline and in processes, sharding, barriers, fan-out, fusion, the bus."""
from __future__ import annotations

import os

import pytest

from pipeline.bus import Message
from pipeline.pipeline import Pipeline
from pipeline.errors import ConfigError
from stages.basic import Identity, NullSink, TestSource
from stages_for_tests import CallerSource, Doubler, Recorder, ShardChecker, Warner, read_record

MODES = ["inline", "process"]
SOURCE = "test-src epochs=3 pages=700 batch-pages=64 page-size=256"


def record_of(description: str, mode: str, tmp_path, **run_options) -> dict:
    """Run ``description ! recorder`` and return what the recorder saw."""
    path = tmp_path / f"record-{mode}.json"
    p = Pipeline.parse(f"{description} ! recorder path={path}")
    p.run(mode=mode, timeout=60, **run_options)
    return read_record(path)


def expected_events(epochs: int, pages: int, batches_per_epoch: int) -> list:
    events = [["LAYOUT", 0, None]]
    for epoch in range(epochs):
        events += [["data", epoch]] * batches_per_epoch + [["EPOCH_END", epoch, pages]]
    return events + [["END_OF_STREAM", epochs - 1, None]]


@pytest.mark.parametrize("mode", MODES)
def test_chain_delivers_every_page_in_epoch_order_with_page_counted_epoch_ends(mode, tmp_path):
    record = record_of(f"{SOURCE} ! identity", mode, tmp_path)
    assert record["events"] == expected_events(3, 700, 11)
    assert len(record["pages"]) == 3 * 700


@pytest.mark.parametrize("middle", ["identity", "shard-checker workers=2 ! identity", "doubler ! identity"])
def test_small_batches_sent_together_arrive_complete_and_in_order(middle, tmp_path):
    """Small batches made at the same moment (a back-to-back source's page batch and epoch end, a stage's
    outputs for one input) travel as one message: every batch still arrives, in order, counted."""
    source = "back-to-back-src epochs=3 pages=700 batch-pages=64 page-size=256"
    record = record_of(f"{source} ! {middle}", "process", tmp_path)
    events = record["events"]
    assert [e for e in events if e[0] != "data"] == [e for e in expected_events(3, 700, 11) if e[0] != "data"]
    in_stream_order = [(e[1], e[0] == "EPOCH_END") for e in events if e[0] in ("data", "EPOCH_END")]
    assert in_stream_order == sorted(in_stream_order)        # each epoch's pages before its end, epochs in order
    assert sorted(record["pages"]) == sorted(record_of(f"{source} ! {middle}", "inline", tmp_path)["pages"])
    assert len(record["pages"]) == 3 * 700


def test_same_pipeline_gives_the_same_output_inline_and_in_processes(tmp_path):
    description = f"{SOURCE} pattern=random ! shard-checker workers=3 ! identity workers=2"
    inline = record_of(description, "inline", tmp_path)
    process = record_of(description, "process", tmp_path)
    assert inline["pages"] == process["pages"]
    assert [e for e in inline["events"] if e[0] != "data"] == [e for e in process["events"] if e[0] != "data"]


@pytest.mark.parametrize("mode", MODES)
def test_page_sharded_workers_see_only_their_pages_and_the_barrier_sums_their_counts(mode, tmp_path):
    record = record_of(f"{SOURCE} ! shard-checker workers=3", mode, tmp_path)
    markers = [e for e in record["events"] if e[0] != "data"]
    assert markers == [e for e in expected_events(3, 700, 0)]
    assert len(record["pages"]) == 2100


@pytest.mark.parametrize("mode", MODES)
def test_no_batch_of_the_next_epoch_passes_a_fan_in_before_the_epoch_end(mode, tmp_path):
    record = record_of(f"{SOURCE} ! identity workers=3 ! identity workers=2", mode, tmp_path)
    current = 0
    for event in record["events"]:
        if event[0] == "data":
            assert event[1] == current
        elif event[0] == "EPOCH_END":
            assert event[1] == current and event[2] == 700
            current += 1
    assert current == 3


@pytest.mark.parametrize("mode", MODES)
def test_tee_sends_everything_to_every_branch(mode, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    p = Pipeline.parse(f"{SOURCE} ! tee name=t ! recorder path={first}  t. ! identity workers=2 ! recorder path={second}")
    p.run(mode=mode, timeout=60)
    assert read_record(first)["pages"] == read_record(second)["pages"]
    assert len(read_record(first)["pages"]) == 2100


@pytest.mark.parametrize("mode", MODES)
def test_fusable_neighbours_run_as_one_stage_unless_fusion_is_off(mode):
    def run(fuse: bool):
        return Pipeline.parse("test-src epochs=1 pages=10 ! doubler ! identity ! null-sink").run(
            mode=mode, fuse=fuse, timeout=60)

    fused, apart = run(True), run(False)
    assert list(dict.fromkeys(name for name, _ in fused.statistics)) == [  # statistics under every element's name
        "test-src0", "doubler0", "identity0", "null-sink0"]
    assert [fused.totals(name).get("fused_as") for name in ("doubler0", "identity0", "null-sink0")] == [
        "doubler0+identity0", "doubler0+identity0", None]
    assert "fused_as" not in apart.totals("doubler0")
    for name in ("doubler0", "identity0"):
        for key in ("batches_in", "pages_in", "bytes_in", "batches_out", "pages_out", "bytes_out", "counters"):
            assert fused.totals(name)[key] == apart.totals(name)[key], (name, key)
    assert fused.totals("doubler0")["counters"] == {"passed": 1}


def test_a_subclass_inheriting_fuse_is_never_fused():
    class Tripler(Doubler):
        factory_name = "tripler"

    assert Pipeline.chain(TestSource(), Tripler(), Identity(), NullSink()).plan().names() == [
        "test-src0", "tripler0", "identity0", "null-sink0"]


@pytest.mark.parametrize("mode", MODES)
def test_bus_reports_statistics_per_worker_with_stage_counters(mode):
    messages: list[Message] = []
    p = Pipeline.parse("test-src epochs=2 pages=100 batch-pages=10 ! shard-checker workers=2 ! null-sink")
    result = p.run(mode=mode, on_message=messages.append, timeout=60)
    assert {(m.stage, m.worker) for m in messages if m.kind == "stats"} == {
        ("test-src0", 0), ("shard-checker0", 0), ("shard-checker0", 1), ("null-sink0", 0)}
    assert any(m.kind == "eos" and m.stage == "null-sink0" for m in messages)
    checker = result.totals("shard-checker0")
    assert checker["pages_in"] == checker["pages_out"] == 200 and checker["workers"] == 2
    assert result.statistics[("null-sink0", 0)]["counters"] == {"pages": 200, "bytes": 200 * (4096 + 9), "epochs": 2}
    assert result.totals("test-src0")["batches_out"] == 1 + 2 * 10 + 2 + 1


@pytest.mark.parametrize("mode", MODES)
def test_stage_warnings_reach_the_bus_and_the_result(mode):
    messages: list[Message] = []
    result = Pipeline.parse("test-src epochs=1 pages=8 ! warner workers=2 ! null-sink").run(
        mode=mode, on_message=messages.append, timeout=60)
    warnings = [m for m in messages if m.kind == "warning"]
    assert {(m.stage, m.fields["message"]) for m in warnings} == {("warner0", "first batch of epoch 0")}
    assert {m.worker for m in warnings} <= {0, 1} and len(result.warnings) == len(warnings) >= 1
    assert all(m.fields["pages"] == 8 for m in warnings)
    assert any(stats["counters"].get("warned") == 1
               for (name, _), stats in result.statistics.items() if name == "warner0")


def test_python_object_properties_run_inline_but_cannot_cross_into_processes():
    seen = []
    p = Pipeline.chain(TestSource(epochs=1, pages=8, batch_pages=4), Warner(callback=lambda b: seen.append(b.npages)),
                       NullSink())
    p.run(mode="inline")
    assert seen == [4, 4]
    with pytest.raises(ConfigError, match="property callback .* cannot be sent to a worker process"):
        p.run(mode="process")


def test_caller_side_stage_runs_in_this_process_while_the_pipeline_runs(tmp_path):
    source = CallerSource()
    record = tmp_path / "caller.json"
    p = Pipeline.chain(source, ShardChecker(workers=2), Recorder(path=str(record)))
    with p.start(mode="process") as handle:
        source.checkpoint(5)
        source.checkpoint(3)
        source.checkpoint(None)
        handle.wait(timeout=30)
    assert source.pid_seen == os.getpid()
    events = read_record(record)["events"]
    assert [e for e in events if e[0] == "EPOCH_END"] == [["EPOCH_END", 0, 5], ["EPOCH_END", 1, 3]]


def test_started_pipeline_streams_messages_until_it_ends():
    p = Pipeline.parse("test-src epochs=2 pages=50 ! identity ! null-sink")
    handle = p.start(mode="process")
    kinds = [message.kind for message in handle.messages()]
    result = handle.wait(timeout=10)
    assert kinds.count("done") == 3
    assert result.totals("null-sink0")["pages_in"] == 100


def test_stop_ends_a_running_pipeline_and_its_processes():
    p = Pipeline.parse("test-src epochs=100000 pages=64 pattern=zeros ! identity workers=2 ! null-sink")
    handle = p.start(mode="process")
    next(m for m in handle.messages() if m.kind == "stats" and m.stage == "test-src0")
    handle.stop()
    assert not handle.running
    sent = handle.wait(timeout=1).totals("test-src0")["batches_out"]
    assert 0 < sent < 100000 * 2


def test_run_timeout_stops_the_pipeline():
    p = Pipeline.parse("test-src epochs=100000 pages=64 pattern=zeros ! null-sink")
    with pytest.raises(TimeoutError):
        p.run(mode="process", timeout=1.0)


def test_spawn_start_method_runs_the_same_pipeline_and_fork_is_refused():
    p = Pipeline.parse("test-src epochs=2 pages=32 ! identity workers=2 ! null-sink")
    result = p.run(mode="process", start_method="spawn", timeout=60)
    assert result.totals("null-sink0")["pages_in"] == 64
    with pytest.raises(ConfigError, match="never fork"):
        p.run(mode="process", start_method="fork")


@pytest.mark.parametrize("mode", MODES)
def test_stage_timers_tick_while_the_source_waits_and_what_they_emit_goes_downstream(mode, tmp_path):
    path = tmp_path / "record.json"
    result = Pipeline.parse(f"pausing-src pause=600ms ! ticker interval=20ms ! recorder path={path}").run(
        mode=mode, timeout=60)
    events = read_record(path)["events"]
    between = events[events.index(["EPOCH_END", 0, 2]) + 1:events.index(["data", 1])]
    assert len(between) >= 5 and set(map(tuple, between)) == {("data", 0)}   # ticks, during the pause
    assert result.statistics[("ticker0", 0)]["counters"]["ticks"] >= len(between)
    assert events[-1][0] == "END_OF_STREAM"   # no tick after the end of the stream
