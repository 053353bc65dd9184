"""remap: page numbers stay stable while process mappings appear, grow, shrink, split or vanish."""
from __future__ import annotations

import pytest

from stages.common.layout import Mapping, Region, array_spec, layout_meta, remap

P = 4096


def test_first_layout_numbers_mappings_densely_in_address_order():
    mappings = [Mapping("heap", 10 * P, 14 * P), Mapping("[anon]", 100 * P, 102 * P)]
    regions, vanished, next_page = remap([], mappings, P, 0)
    assert regions == [Region("heap", 10 * P, 0, 4), Region("[anon]", 100 * P, 4, 2)]
    assert (vanished, next_page) == ([], 6)


def test_growing_mapping_keeps_its_pages_and_adds_fresh_numbers():
    old = [Region("heap", 10 * P, 0, 4), Region("stack", 50 * P, 4, 2)]
    regions, vanished, next_page = remap(old, [Mapping("heap", 10 * P, 16 * P), Mapping("stack", 48 * P, 52 * P)], P, 6)
    assert regions == [Region("heap", 10 * P, 0, 4), Region("heap", 14 * P, 6, 2),
                       Region("stack", 48 * P, 8, 2), Region("stack", 50 * P, 4, 2)]
    assert (vanished, next_page) == ([], 10)


def test_shrinking_splitting_and_vanishing_mappings_report_the_lost_page_ranges():
    old = [Region("a", 0, 0, 10), Region("b", 20 * P, 10, 3)]
    regions, vanished, next_page = remap(old, [Mapping("a", 0, 3 * P), Mapping("a", 5 * P, 8 * P)], P, 13)
    assert regions == [Region("a", 0, 0, 3), Region("a", 5 * P, 5, 3)]
    assert sorted(vanished) == [(3, 2), (8, 2), (10, 3)]
    assert next_page == 13


def test_a_different_mapping_at_the_same_address_gets_new_numbers():
    regions, vanished, next_page = remap([Region("libfoo", 0, 0, 2)], [Mapping("libbar", 0, 2 * P)], P, 2)
    assert regions == [Region("libbar", 0, 2, 2)]
    assert (vanished, next_page) == ([(0, 2)], 4)


def test_layout_meta_lists_regions_and_vanished_ranges():
    meta = layout_meta([Region("a", 4096, 0, 1)], [(5, 2)])
    assert meta == {"regions": [{"name": "a", "start": 4096, "first_page": 0, "npages": 1}],
                    "vanished": [{"first_page": 5, "npages": 2}]}


def test_a_region_holding_an_array_names_its_dtype_and_shape():
    assert Region("g", 0, 0, 2, "<f8", (2, 512)).to_meta() == {
        "name": "g", "start": 0, "first_page": 0, "npages": 2, "dtype": "<f8", "shape": [2, 512]}


@pytest.mark.parametrize("dtype, shape, problem", [
    ("O", [1], "Python objects"), ("float99", [1], "not a numpy dtype"), (7, [1], "not a numpy dtype string"),
    ("<f8", [-1], "non-negative"), ("<f8", "12", "non-negative"), ("<f8", [True], "non-negative"),
    ("<f8", [1025], "does not fit in 8192 bytes")])
def test_untrusted_array_specs_are_checked(dtype, shape, problem):
    with pytest.raises(ValueError, match=problem):
        array_spec(dtype, shape, capacity=8192)
    assert array_spec("float64", [1024], capacity=8192) == ("<f8", (1024,))
