"""What several stages share: the wire format, the layout, page digests, the replica store and
the ack protocol. Nothing here is a stage."""
