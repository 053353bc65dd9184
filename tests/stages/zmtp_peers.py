"""Hostile peers for the socket tests: raw TCP connections that speak just enough ZMTP 3.0 to get read."""
from __future__ import annotations

import os
import socket


def _greeting(mechanism: bytes) -> bytes:
    """The 64-byte ZMTP 3.0 greeting: signature, version 3.0, mechanism, as-client, filler."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + bytes(31)


ZMTP_NULL_GREETING = _greeting(b"NULL")
ZMTP_CURVE_GREETING = _greeting(b"CURVE")
_READY_BODY = b"\x05READY" + b"\x0bSocket-Type" + (4).to_bytes(4, "big") + b"PUSH"
ZMTP_READY_PUSH = bytes([0x04, len(_READY_BODY)]) + _READY_BODY
"""The NULL mechanism's READY command of a PUSH socket."""


def long_frame_header(size: int, command: bool = False) -> bytes:
    """The header of a frame announcing ``size`` bytes (a command frame during a handshake)."""
    return bytes([0x06 if command else 0x02]) + size.to_bytes(8, "big")


def resident_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def announce_and_send(port: int, size: int, sent: int, *, mechanism: bytes = b"NULL") -> socket.socket | None:
    """Connect, greet, announce a frame of ``size`` bytes and send ``sent`` of them; the socket if the peer
    is still connected (the caller closes it), None once the receiver hung up."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        raw.sendall(_greeting(mechanism))
        if mechanism == b"NULL":
            raw.recv(64)
            raw.sendall(ZMTP_READY_PUSH)
        raw.sendall(long_frame_header(size, command=mechanism != b"NULL"))
        chunk = bytes(min(sent, 1 << 20))
        while sent > 0:
            raw.sendall(chunk[:sent])
            sent -= len(chunk)
        return raw
    except OSError:
        raw.close()
        return None
