"""``pagepipe replica verify``: what it prints for a consistent and a damaged replica."""
import argparse

import numpy as np
from rich.console import Console

from stages.apps.replica_cli import add_arguments, run
from stages.common.pages import combine_digests, digest_pages
from stages.common.replica_store import IMAGE, ReplicaStore, replica_layout, whole_pages

PAGE = 4096
REGIONS = [{"name": "heap", "start": 0x10000, "first_page": 0, "npages": 6},
           {"name": "stack", "start": 0x90000, "first_page": 8, "npages": 2}]
ALL_PAGES = np.array([0, 1, 2, 3, 4, 5, 8, 9], dtype=np.uint64)


def commit(store: ReplicaStore, epoch: int, page_numbers: np.ndarray, value: int) -> None:
    pages = np.full((len(page_numbers), PAGE), value, dtype=np.uint8)
    digests = digest_pages(pages)
    store.commit(epoch, replica_layout(PAGE, REGIONS, max_pages=1 << 20), page_numbers,
                 [whole_pages(pages)], digests, combine_digests(page_numbers, digests))


def _verify_command(path) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    console = Console(record=True, width=200)
    code = run(parser.parse_args(["verify", str(path)]), console)
    return code, console.export_text()


def test_verify_command_reports_consistent_and_damaged_replicas(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 3)
    store.close()
    code, text = _verify_command(tmp_path)
    assert code == 0 and "epoch 1, 8 pages, consistent" in text
    with open(tmp_path / IMAGE, "r+b") as image:
        image.seek(9 * PAGE)
        image.write(b"\x00\x01")
    code, text = _verify_command(tmp_path)
    assert code == 1 and "damaged pages: 9" in text




def test_verify_command_says_what_to_do_about_damaged_pages(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 3)
    store.close()
    with open(tmp_path / IMAGE, "r+b") as image:
        image.write(b"\x07")
    code, text = _verify_command(tmp_path)
    assert code == 1 and "damaged pages: 0" in text
    assert "asks for a resync" in text and "epoch 1" in text


def _inspect_command(path) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    console = Console(record=True, width=200)
    code = run(parser.parse_args(["inspect", str(path)]), console)
    return code, console.export_text()


def test_inspect_command_lists_regions_with_dtypes_shapes_epoch_and_age(tmp_path):
    regions = [dict(REGIONS[0], dtype="<f8", shape=[3, 1024]), REGIONS[1]]
    store = ReplicaStore(tmp_path, fsync=False)
    pages = np.full((len(ALL_PAGES), PAGE), 1, dtype=np.uint8)
    digests = digest_pages(pages)
    store.commit(4, replica_layout(PAGE, regions, max_pages=1 << 20), ALL_PAGES, [whole_pages(pages)],
                 digests, combine_digests(ALL_PAGES, digests))
    store.close()
    code, text = _inspect_command(tmp_path)
    assert code == 0
    assert "epoch 4, committed" in text and "s ago, 2 regions, 8 pages of 4096 bytes" in text
    assert "heap: <f8 (3, 1024), pages 0..5" in text
    assert "stack: bytes (8192), pages 8..9" in text


def test_inspect_command_says_why_a_directory_is_no_replica(tmp_path):
    code, text = _inspect_command(tmp_path)
    assert code == 1 and "no manifest.json" in text
