"""Launch strings: elements, properties with units, links, references, and errors pointing at the word."""
from __future__ import annotations

import pytest

from pipeline.errors import CapsError, ConfigError, ParseError
from pipeline.launch import tokenize
from pipeline.pipeline import Pipeline
from stages.basic import NullSink, TestSource
from tests_pipeline_support import caret_column


def test_chain_with_properties_parsed_with_units():
    p = Pipeline.parse("test-src epochs=2 page-size=8KiB pattern=zeros ! identity workers=3 ! null-sink")
    source = p.stage("test-src0")
    assert (source.epochs, source.page_size, source.pattern) == (2, 8192, "zeros")
    assert p.stage("identity0").workers == 3
    assert [node.name for node in p.plan().nodes] == ["test-src0", "identity0", "null-sink0"]


def test_tee_references_fan_out_to_several_branches():
    p = Pipeline.parse("test-src ! tee name=t ! null-sink name=a  t. ! identity ! null-sink name=b")
    nodes = {node.name: node for node in p.plan().nodes}
    names = p.plan().names()
    assert sorted(names[i] for i in nodes["t"].downstream) == ["a", "identity0"]


def test_quoted_values_keep_spaces():
    assert [t.text for t in tokenize('a x="1 2" ! b')] == ["a", "x=1 2", "!", "b"]


@pytest.mark.parametrize("text, word, message", [
    ("test-src ! idenity ! null-sink", "idenity", "did you mean identity"),
    ("test-src pagez=3 ! null-sink", "pagez", "unknown property 'pagez'"),
    ("test-src epochs=many ! null-sink", "many", "not a valid int"),
    ("test-src page-size=4 ! null-sink", "4", "below the minimum"),
    ("test-src ! ! null-sink", "! null", "'!' must follow an element"),
    ("test-src ! null-sink !", "!", "links to nothing"),
    ("test-src ! null-sink  identity ! null-sink", "identity", "needs an upstream element"),
    ("test-src name=\"t ! null-sink", '"t', "unterminated quote"),
    ("test-src ! null-sink  q. ! null-sink", "q.", "no element is named 'q'"),
    ("epochs=3 ! null-sink", "epochs", "property without an element"),
])
def test_bad_descriptions_are_rejected_with_a_caret_under_the_offending_word(text, word, message):
    with pytest.raises(ConfigError) as caught:
        Pipeline.parse(text)
    assert message in str(caught.value)
    assert caret_column(str(caught.value)) == text.rindex(word)


def test_format_mismatch_names_both_stages_and_both_formats():
    text = "test-src ! rle ! null-sink"
    with pytest.raises(CapsError) as caught:
        Pipeline.parse(text)
    message = str(caught.value)
    assert "test-src0" in message and "rle0" in message and "pages" in message and "deltas" in message
    assert caret_column(message) == text.index("rle")


def test_a_sink_cannot_feed_another_stage_and_outputs_must_be_linked():
    with pytest.raises(CapsError, match="null-sink0 is a sink"):
        Pipeline.parse("test-src ! null-sink ! null-sink")
    with pytest.raises(ConfigError, match="not linked"):
        Pipeline.parse("test-src ! identity")


def test_python_api_builds_the_same_graph_and_rejects_two_upstreams():
    source, sink = TestSource(epochs=1), NullSink()
    p = Pipeline.chain(source, sink)
    assert p.stage("test-src0") is source and p.plan().names() == ["test-src0", "null-sink0"]
    other = p.add(TestSource())
    p.link(other, sink)
    with pytest.raises(ConfigError, match="two upstream elements"):
        p.plan()


def test_object_properties_cannot_come_from_a_launch_string():
    with pytest.raises(ParseError, match="takes a Python object"):
        Pipeline.parse("test-src ! classify raw-predicate=x ! null-sink")
