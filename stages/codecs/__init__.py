"""Page codecs: XOR-delta run-length formats and the entropy coders that follow them.

Usage::

    from stages.codecs import get_codec, list_codecs

    codec = get_codec("native+zstd", level=3)      # or "native", "xbzrle", "xen", "xen+lz4", ...
    encoded = codec.encode(current, cached)        # cached is brought up to date in place
    codec.decode(encoded, replica)                 # replica rows become the current pages

``current``, ``cached`` and ``replica`` are C-contiguous ``(n, page_size)``
uint8 arrays; ``page_size`` is a power of two from 512 to 65536 (4096 only
for ``xbzrle`` and ``xen``, the page size those systems define).
``encode(current, cached, slots=...)`` pairs page i with ``cached[slots[i]]``
and ``decode(encoded, replica, rows=...)`` applies page i onto
``replica[rows[i]]``, so a large cache or replica needs no gathered copies.

Run formats (specified byte by byte in docs/FORMAT.md):

- ``native``: pagepipe's own: byte runs of new data with ULEB128 skip and
  length headers, equal gaps of up to 2 bytes merged; a page whose encoding
  would not be smaller than the page is sent FULL, and one that became all
  zeros ZERO (option ``emit_zero``, default True).
- ``xbzrle``: QEMU's XBZRLE page encoding, byte for byte, including where QEMU
  declares overflow (the page is then sent FULL).
- ``xen``: Xen's 2011 Remus checkpoint compression, byte for byte (an
  unchanged page is the byte 0x00; a page with every word changed takes 4105
  bytes, as in Xen).

Entropy coders (``zstd`` with ``level`` 1..22, default 1; ``lz4``) compress a
whole payload; chain one after a run format with "+". Alone they offer
``compress(data)`` and ``decompress(data, raw_size)``.

``encode`` returns an :class:`Encoded`: ``payload`` (1-D uint8), ``offsets``
(uint64, n + 1, into the payload after entropy decoding), ``kinds``
(``pipeline.batch.PageKind``: UNCHANGED, DELTA, FULL, ZERO), ``codec`` (the
chain name) and ``raw_size``. A FULL page's slice is the raw page in every
format, so callers may add FULL pages (and empty ZERO pages) without the
codec; ``codec.system_bytes(encoded, i)`` gives a page's bytes exactly as
QEMU or Xen would carry them (Xen prefixes a whole page with 0x80).

Bad input: ``decode`` checks every offset, kind, run length and row against
the buffers it was given before writing anything; a malformed payload raises
``pipeline.errors.CorruptData`` (a ValueError) naming the page index and byte
offset, and leaves the replica untouched. Wrong dtypes raise TypeError; wrong
shapes, page sizes, non-contiguous or read-only arrays raise ValueError.

Codecs have ``.name`` (canonical chain name) and ``get_config()``;
``get_codec(config)`` rebuilds one from its config, as numcodecs does. A codec
object holds compression contexts: use one per thread (they are cheap).
"""
from __future__ import annotations

from typing import Any, Union

from pipeline.errors import ConfigError
from stages.codecs.chain import ChainCodec
from stages.codecs.encoded import Encoded
from stages.codecs.entropy import EntropyCodec, Lz4Codec, ZstdCodec
from stages.codecs.page_codec import NativeCodec, PageCodec, XbzrleCodec, XenCodec

__all__ = ["ChainCodec", "Encoded", "EntropyCodec", "PageCodec", "get_chain_codec", "get_codec", "get_entropy_codec", "get_page_codec",
           "is_entropy_coded", "list_codecs", "split_chain_name"]

Codec = Union[PageCodec, EntropyCodec, ChainCodec]

PAGE_CODECS: dict[str, type[PageCodec]] = {"native": NativeCodec, "xbzrle": XbzrleCodec, "xen": XenCodec}
ENTROPY_CODECS: dict[str, type[EntropyCodec]] = {"zstd": ZstdCodec, "lz4": Lz4Codec}
_OPTIONS = {"native": {"emit_zero"}, "xbzrle": set(), "xen": set(), "zstd": {"level"}, "lz4": set()}


CHAIN_SEPARATOR = "+"


def split_chain_name(name: str) -> tuple[str, list[str]]:
    """A chain name as ``meta["codec"]`` carries it: "native+zstd" -> ("native", ["zstd"]); "native" -> ("native", [])."""
    run_format, *layers = name.split(CHAIN_SEPARATOR)
    return run_format, layers


def is_entropy_coded(name: str) -> bool:
    """Whether a chain compresses the whole payload, so a batch's offsets index the decompressed bytes."""
    return bool(split_chain_name(name)[1])


def get_page_codec(name: str, **options: Any) -> PageCodec:
    """``get_codec`` for a run format ("native", "xbzrle", "xen"); ConfigError for any other codec."""
    codec = get_codec(name, **options)
    if not isinstance(codec, PageCodec):
        raise ConfigError(f"codec {name!r} is not a run format ({', '.join(PAGE_CODECS)})")
    return codec


def get_chain_codec(name: str, **options: Any) -> PageCodec | ChainCodec:
    """``get_codec`` for what encodes pages: a run format, alone or with an entropy coder; ConfigError otherwise."""
    codec = get_codec(name, **options)
    if isinstance(codec, EntropyCodec):
        raise ConfigError(f"codec {name!r} has no run format ({', '.join(PAGE_CODECS)})")
    return codec


def get_entropy_codec(name: str, **options: Any) -> EntropyCodec:
    """``get_codec`` for an entropy coder ("zstd", "lz4"); ConfigError for any other codec."""
    codec = get_codec(name, **options)
    if not isinstance(codec, EntropyCodec):
        raise ConfigError(f"codec {name!r} is not an entropy coder ({', '.join(ENTROPY_CODECS)})")
    return codec


def list_codecs() -> list[str]:
    """Every codec name get_codec accepts: run formats, entropy coders, and their chains."""
    chains = [f"{page}{CHAIN_SEPARATOR}{entropy}" for page in PAGE_CODECS for entropy in ENTROPY_CODECS]
    return [*PAGE_CODECS, *ENTROPY_CODECS, *chains]


def get_codec(name: str | dict[str, Any], **options: Any) -> Codec:
    """The codec called ``name`` ("native", "zstd", "xbzrle+lz4", ...), or rebuilt from a ``get_config()`` dict.

    Options go to the part that takes them (``level`` to zstd, ``emit_zero``
    to native); an unknown name or option raises ConfigError.
    """
    if isinstance(name, dict):
        options = {**{k: v for k, v in name.items() if k != "id"}, **options}
        name = name.get("id", "")
    if not isinstance(name, str):
        raise ConfigError(f"codec name must be a string, got {name!r}")
    parts = name.strip().lower().split(CHAIN_SEPARATOR)
    page_name, entropy_names = (parts[0], parts[1:]) if parts[0] in PAGE_CODECS else ("", parts)
    if len(entropy_names) > 1 or any(part not in ENTROPY_CODECS for part in entropy_names) or parts == [""]:
        raise ConfigError(f"unknown codec {name!r}: expected a run format ({', '.join(PAGE_CODECS)}), "
                          f"an entropy coder ({', '.join(ENTROPY_CODECS)}), or run format + entropy coder")
    accepted = set().union(*(_OPTIONS[part] for part in parts))
    unknown = set(options) - accepted
    if unknown:
        raise ConfigError(f"codec {name!r} takes no option {', '.join(sorted(unknown))} "
                          f"(accepts: {', '.join(sorted(accepted)) or 'none'})")
    page_codec = PAGE_CODECS[page_name](**{k: v for k, v in options.items() if k in _OPTIONS[page_name]}) \
        if page_name else None
    entropy_codec = ENTROPY_CODECS[entropy_names[0]](**{k: v for k, v in options.items()
                                                        if k in _OPTIONS[entropy_names[0]]}) \
        if entropy_names else None
    if page_codec and entropy_codec:
        return ChainCodec(page_codec, entropy_codec)
    codec = page_codec or entropy_codec
    if codec is None:  # an empty name, refused above
        raise ConfigError(f"unknown codec {name!r}")
    return codec
