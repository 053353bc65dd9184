"""The stage contract, checked when a class is defined and when it runs; registering a stage in-process;
a stage's counters in totals, stats JSON and the summary table."""
from __future__ import annotations

import json
from typing import Iterable

import pytest
from rich.console import Console

from pipeline import registry
from pipeline.batch import ANY, PAGES, Batch
from pipeline.cli import main
from pipeline.errors import ConfigError, StageFailed
from pipeline.pipeline import Pipeline
from pipeline.progress import print_summary
from pipeline.stage import Property, Stage, StageContext
from pipeline.testing import Harness, pages_batch
from stages.basic import Identity, NullSink, TestSource

MODES = ["inline", "process"]


class ForgetsSuperStart(Identity):
    """Overrides start without calling super().start: its warnings must still reach the bus."""

    factory_name = "forgets-super-start"

    def start(self, context: StageContext) -> None:
        self.seen = 0

    def process(self, batch: Batch) -> Iterable[Batch]:
        if not self.seen:
            self.context.warn("first batch")
        self.seen += 1
        yield batch


class ReturnsNone(Identity):
    factory_name = "returns-none"

    def process(self, batch: Batch):
        batch.meta["touched"] = True  # forgot to return or yield it


class Unnamed(Identity):
    factory_name = ""


@registry.register
class Marker(Identity):
    """Registered in-process: usable in launch strings of this program, in both modes."""

    factory_name = "contract-marker"
    label = Property("str", "x", "counter name to count pages under")

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.counters[self.label] = self.counters.get(self.label, 0) + batch.npages
        yield batch


@pytest.mark.parametrize("attributes, message", [
    ({"input_caps": PAGES}, r"input_caps must be a tuple of formats .* \(write \('pages',\)\)"),
    ({"input_caps": ("pages", "bogus")}, "input_caps must be a tuple of formats"),
    ({"output_caps": "bogus"}, "output_caps must be one format"),
    ({"shard_key": "epoch"}, "shard_key must be None or 'page'"),
    ({"max_workers": 0}, "max_workers must be a positive int"),
    ({"runs_in_caller": 1}, "runs_in_caller must be True or False"),
    ({"factory_name": "two words"}, "factory_name 'two words' is not a word"),
    ({"cache": Property}, r"cache = Property: call it"),
])
def test_a_class_breaking_the_contract_is_refused_when_defined(attributes, message):
    with pytest.raises(ConfigError, match=message):
        type("Broken", (Stage,), {"factory_name": "broken", **attributes})


def test_malformed_properties_are_refused_when_defined():
    with pytest.raises(ValueError, match="needs choices"):
        Property("choice", "a", "pick one")
    with pytest.raises(ValueError, match="needs a doc string"):
        Property("int", 1, "")
    with pytest.raises(ConfigError, match="BadDefault: default of property size: .many. is not a valid int"):
        type("BadDefault", (Stage,), {"factory_name": "bad-default", "size": Property("int", "many", "doc")})


def test_a_stage_without_a_factory_name_cannot_be_an_element_or_registered():
    with pytest.raises(ConfigError, match="Unnamed has no factory_name"):
        Pipeline.chain(TestSource(), Unnamed(), NullSink())
    with pytest.raises(ConfigError, match="Unnamed has no factory_name"):
        registry.register(Unnamed)


def test_registering_refuses_a_taken_name_and_local_classes():
    class Local(Identity):
        factory_name = "local-stage"

    with pytest.raises(ConfigError, match="defined inside a function"):
        registry.register(Local)

    with pytest.raises(ConfigError, match="'identity' is taken by stages.basic:Identity"):
        registry.register(Renamed)


class Renamed(Identity):
    factory_name = "identity"


@pytest.mark.parametrize("mode", MODES)
def test_a_process_returning_none_fails_naming_the_stage(mode):
    with pytest.raises(StageFailed, match="returns-none0.*process\\(\\) returned NoneType, not an iterable"):
        Pipeline.chain(TestSource(epochs=1), ReturnsNone(), NullSink()).run(mode=mode, timeout=60)
    with Harness(ReturnsNone()) as harness, pytest.raises(ConfigError, match="returns-none: process\\(\\) returned"):
        harness.push(pages_batch([1]))


@pytest.mark.parametrize("mode", MODES)
def test_the_executor_sets_the_context_when_start_forgets_super(mode):
    result = Pipeline.chain(TestSource(epochs=1), ForgetsSuperStart(), NullSink()).run(mode=mode, timeout=60)
    assert [(w.stage, w.fields["message"]) for w in result.warnings] == [("forgets-super-start0", "first batch")]


@pytest.mark.parametrize("mode", MODES)
def test_a_registered_stage_runs_from_a_launch_string_with_its_counters_in_the_totals(mode, tmp_path):
    result = Pipeline.parse("test-src epochs=2 pages=30 ! contract-marker label=seen ! null-sink").run(
        mode=mode, timeout=60)
    assert result.totals("contract-marker0")["counters"] == {"seen": 60}
    assert result.to_json()["stages"]["contract-marker0"]["counters"] == {"seen": 60}
    console = Console(record=True, width=200)
    print_summary(console, result)
    assert "seen=60" in console.export_text()


def test_stats_json_and_inspect_show_counters_but_not_internal_properties(tmp_path, capsys):
    stats = tmp_path / "stats.json"
    assert main(["launch", "--mode", "inline", "--stats-json", str(stats),
                 "test-src epochs=1 pages=20 ! contract-marker label=pages ! null-sink"]) == 0
    assert json.loads(stats.read_text())["stages"]["contract-marker0"]["counters"] == {"pages": 20}
    assert "pages=20" in capsys.readouterr().out
    assert main(["inspect", "contract-marker"]) == 0
    assert "label" in capsys.readouterr().out
    assert main(["inspect", "xor-delta"]) == 0
    listing = capsys.readouterr().out
    assert "cache-pages" in listing and "classify" not in listing.split("Properties:")[1]


def test_any_caps_stage_is_accepted():
    class Passthrough(Stage):
        factory_name = "any-passthrough"
        input_caps = (ANY,)
        output_caps = ANY

    assert Passthrough().accepts(PAGES)
