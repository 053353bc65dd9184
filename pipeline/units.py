"""Parse property values written with units: sizes (``32MiB``), durations (``25ms``), and endpoints
(``tcp://host:port``)."""
from __future__ import annotations

import re

from .errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0}
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``"32MiB"`` -> 33554432. Plain numbers are bytes."""
    if isinstance(text, int):
        return text
    match = _NUMBER_WITH_UNIT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 64KiB, 32MiB, 1GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | float, require_unit: bool = False) -> float:
    """``"25ms"`` -> 0.025 seconds. Plain numbers are seconds, unless ``require_unit`` (launch
    strings: ``interval=25`` is refused, only a bare ``0`` needs no unit)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _NUMBER_WITH_UNIT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ConfigError(f"not a duration: {text!r} (examples: 25ms, 1.5s, 2min)")
    value = float(match.group(1)) * _DURATION_UNITS[unit]
    if require_unit and not unit and value != 0:
        raise ConfigError(f"{text!r} has no unit: write {match.group(1)}s or {match.group(1)}ms")
    return value


ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc", "pgm", "epgm", "udp", "ws", "wss", "vmci")
_TCP_ADDRESS = re.compile(r"^(?:\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.;:-]+):(?:\*|[0-9]{1,5})$")


def parse_endpoint(text: str) -> str:
    """Check a ZeroMQ endpoint (``tcp://host:port``, ``ipc:///path``); a leading ``@`` or ``>``
    (bind or connect) is kept. ConfigError saying what is missing."""
    text = str(text)
    bare = text[1:] if text[:1] in ("@", ">") else text
    scheme, separator, address = bare.partition("://")
    if not separator:
        raise ConfigError(f"endpoint {text!r} has no scheme: write tcp://{bare} (or ipc:///path)")
    if scheme not in ENDPOINT_SCHEMES:
        raise ConfigError(f"endpoint {text!r}: unknown scheme {scheme!r}; use tcp://host:port or ipc:///path")
    if not address:
        raise ConfigError(f"endpoint {text!r} has no address after {scheme}://")
    if scheme == "tcp":
        if not _TCP_ADDRESS.match(address):
            raise ConfigError(f"endpoint {text!r}: a tcp endpoint is tcp://host:port (port a number, or * when binding)")
        port = address.rpartition(":")[2]
        if port != "*" and not 0 < int(port) < 65536:
            raise ConfigError(f"endpoint {text!r}: port {port} is outside 1..65535")
    return text


def format_size(n: float) -> str:
    """Human-readable byte count, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
