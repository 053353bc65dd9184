"""Fusion: neighbouring elements run as one stage, an optimisation that never changes results.

The rule (every change that merges stages follows it): **merging stages never
changes results**. A fused stage emits exactly the batches its elements would
emit apart, keeps exactly their counters, and each original element still
reports its own statistics under its own name. Hence:

- the runtime asks ``fuse`` only of a stage whose own class defines it; a
  subclass that merely inherits ``fuse`` is never fused (it may process
  differently from its parent);
- a ``fuse`` implementation accepts only downstream stages whose exact class
  it knows (``type(downstream) is X``, never ``isinstance``), and never
  rebuilds a subclass or a user's stage as a built-in;
- the fused stage keeps a ``Fusion``: one member per original element, in
  order (a stage object whose ``counters`` it keeps as that element would),
  and the ``Traffic`` of each inner link (what member i would have emitted to
  member i+1, control batches included).

The runtime reports member i under element i's name: its input is the node's
input (i = 0) or inner link i-1, its output inner link i or the node's output
(the last member); time and queue figures are the shared worker's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .batch import Batch

if TYPE_CHECKING:
    from .stage import Stage


@dataclass
class Traffic:
    """Batches, pages and bytes that crossed one inner link of a fused stage."""

    batches: int = 0
    pages: int = 0
    bytes: int = 0

    def count(self, batch: Batch, extra_bytes: int = 0) -> None:
        """Count ``batch`` (plus ``extra_bytes`` of arrays it would have carried, e.g. a delta's reference)."""
        self.batches += 1
        self.pages += batch.npages
        self.bytes += batch.nbytes + extra_bytes


class Fusion:
    """The original elements of a fused stage (``members``) and the traffic between them (``links``)."""

    def __init__(self, members: Sequence["Stage"], links: Sequence[Traffic] | None = None):
        self.members = list(members)
        self.links = list(links) if links is not None else [Traffic() for _ in self.members[1:]]
        if len(self.links) != len(self.members) - 1:
            raise ValueError(f"{len(self.members)} fused members need {len(self.members) - 1} links")

    @classmethod
    def join(cls, upstream: "Stage", downstream: "Stage") -> "Fusion":
        """``upstream``'s members then ``downstream``'s (each fused or not), linked by a new link (the last of
        upstream's links + 1); the Traffic objects are shared, so what the parts count shows in the whole."""
        up = upstream.fusion or cls([upstream])
        down = downstream.fusion or cls([downstream])
        return cls(up.members + down.members, up.links + [Traffic()] + down.links)

    def link_after(self, member: "Stage") -> Traffic:
        """The link that carries what ``member`` emits to the next member."""
        for index, candidate in enumerate(self.members[:-1]):
            if candidate is member:
                return self.links[index]
        raise ValueError(f"{member!r} is not an inner member of this fusion")
