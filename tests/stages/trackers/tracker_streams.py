"""Checks of the tracker stream contract, shared by the tracker tests."""
from __future__ import annotations

import numpy as np

from pipeline.batch import PAGES, Batch, Flag, PageKind
from stages.common.pages import combine_digests, digest_pages


def replay(batches: list[Batch], batch_pages: int = 256) -> tuple[dict[int, bytes], list[Batch]]:
    """Apply a tracker stream, checking every rule of the contract; returns the pages and the epoch ends."""
    assert batches[0].flags & Flag.LAYOUT, "the stream starts with a LAYOUT"
    assert [b.sequence for b in batches] == list(range(batches[0].sequence, batches[0].sequence + len(batches)))
    assert batches[-1].flags == Flag.END_OF_STREAM
    pages: dict[int, bytes] = {}
    ends: list[Batch] = []
    epoch_pages: dict[int, bytes] = {}
    expected_epoch = 1
    live = set()
    for batch in batches[:-1]:
        batch.validate()
        if batch.flags & Flag.LAYOUT:
            assert not epoch_pages, "a layout comes before an epoch's pages"
            live = {p for r in batch.meta["regions"] for p in range(r["first_page"], r["first_page"] + r["npages"])}
            for gone in batch.meta["vanished"]:
                for page in range(gone["first_page"], gone["first_page"] + gone["npages"]):
                    pages.pop(page, None)
            continue
        assert batch.epoch == expected_epoch
        if batch.flags & Flag.EPOCH_END:
            numbers = np.array(sorted(epoch_pages), dtype=np.uint64)
            data = np.frombuffer(b"".join(epoch_pages[int(p)] for p in numbers), np.uint8).reshape(-1, batch.page_size)
            assert batch.meta["pages"] == len(numbers)
            assert batch.meta["digest"] == int(combine_digests(numbers, digest_pages(data)))
            assert batch.meta["pause_ms"] >= 0 and batch.meta["time"] > 0
            pages.update(epoch_pages)
            epoch_pages = {}
            ends.append(batch)
            expected_epoch += 1
            continue
        assert batch.format == PAGES and 0 < batch.npages <= batch_pages
        assert np.all(batch.kinds == PageKind.NORMAL)
        assert batch.data.dtype == np.uint8 and batch.data.flags.c_contiguous
        for number, row in zip(batch.page_numbers.tolist(), batch.data):
            assert number in live, f"page {number} outside the layout"
            assert number not in epoch_pages, f"page {number} twice in epoch {batch.epoch}"
            epoch_pages[number] = row.tobytes()
    assert not epoch_pages, "pages after the last epoch end"
    assert batches[-1].epoch == len(ends)
    return pages, ends


def epoch_page_numbers(batches: list[Batch], epoch: int) -> list[int]:
    """Sorted page numbers the data batches of ``epoch`` carry."""
    return sorted(int(p) for b in batches if b.epoch == epoch and b.npages for p in b.page_numbers)
