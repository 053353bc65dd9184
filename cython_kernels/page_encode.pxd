# One page's encoding decision, shared by the batch encoders: run-length encode
# the page against its cached copy (updated in place) in one of the run formats,
# and say what travels: DELTA (the runs), UNCHANGED, FULL (the encoding would
# not be smaller: the page whole) or ZERO (``emit_zero``: the page became all
# zeros). The same decisions as ``page_codecs._encode_pages``.
from libc.stdint cimport uint8_t
from libc.string cimport memcpy

from cython_kernels.native_format cimport native_encode_page
from cython_kernels.run_scan cimport is_zero_page
from cython_kernels.xbzrle_format cimport xbzrle_encode_page
from cython_kernels.xen_format cimport XEN_OVERHEAD, xen_encode_page

cdef enum:
    # run formats (page_codecs.NATIVE, XBZRLE, XEN)
    ENCODE_NATIVE = 0
    ENCODE_XBZRLE = 1
    ENCODE_XEN = 2
    # page kinds: the values of pipeline.batch.PageKind (kernels import nothing of ours)
    PAGE_NORMAL = 0
    PAGE_ZERO = 1
    PAGE_RAW = 2
    PAGE_FULL = 3
    PAGE_DELTA = 4
    PAGE_UNCHANGED = 5
    ZERO_CHECK_SHIFT = 4  # DELTAs longer than size >> 4 are checked for "now all zero"


cdef inline Py_ssize_t encode_room(int fmt, Py_ssize_t size) noexcept nogil:
    """The most bytes one page's encoding takes in format ``fmt`` (before COPY_SLACK)."""
    return size + XEN_OVERHEAD if fmt == ENCODE_XEN else size


cdef inline Py_ssize_t encode_page(int fmt, const uint8_t *page, uint8_t *cache, Py_ssize_t size, uint8_t *out,
                                   bint emit_zero, uint8_t *kind) noexcept nogil:
    """Encode ``page`` against ``cache`` into ``out`` (room: encode_room + COPY_SLACK); set ``kind``; return the length."""
    cdef Py_ssize_t length
    if fmt == ENCODE_NATIVE:
        length = native_encode_page(page, cache, size, out)
    elif fmt == ENCODE_XBZRLE:
        length = xbzrle_encode_page(page, cache, size, out)
    else:
        length = xen_encode_page(page, cache, size, out)
    if length < 0:
        memcpy(out, page, size)
        memcpy(cache, page, size)
        kind[0], length = PAGE_FULL, size
    elif length == 0 or (fmt == ENCODE_XEN and length == 1):
        kind[0] = PAGE_UNCHANGED
    else:
        kind[0] = PAGE_DELTA
    if (emit_zero and (kind[0] == PAGE_FULL or (kind[0] == PAGE_DELTA and length > size >> ZERO_CHECK_SHIFT))
            and is_zero_page(page, size)):
        kind[0], length = PAGE_ZERO, 0
    return length
