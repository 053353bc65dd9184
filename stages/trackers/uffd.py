"""Kernel write tracking: userfaultfd async write-protect + the PAGEMAP_SCAN ioctl, via ctypes.

Registering a range with UFFDIO_REGISTER_MODE_WP on a userfaultfd opened with
UFFD_FEATURE_WP_ASYNC makes the kernel resolve write faults itself and only
mark the page "written". One PAGEMAP_SCAN with PM_SCAN_WP_MATCHING then both
lists the written pages and write-protects them again, in time proportional
to the written pages. Struct layouts follow include/uapi/linux/userfaultfd.h
and include/uapi/linux/fs.h (Linux >= 6.7).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform

import numpy as np

from pipeline.errors import TrackerError

_SYSCALL_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

# userfaultfd.h
_UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # userfaultfd() flag: handle user-mode faults only; allowed to unprivileged callers
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

# fs.h
_PAGE_IS_WRITTEN = 1 << 1
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1


def _iowr(kind: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | number


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_UFFDIO_API = _iowr(0xAA, 0x3F, ctypes.sizeof(_UffdioApi))
_UFFDIO_REGISTER = _iowr(0xAA, 0x00, ctypes.sizeof(_UffdioRegister))
_UFFDIO_UNREGISTER = (2 << 30) | (ctypes.sizeof(_UffdioRange) << 16) | (0xAA << 8) | 0x01  # _IOR
_UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, ctypes.sizeof(_UffdioWriteprotect))
_PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_PmScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class UffdError(TrackerError):
    """A userfaultfd or pagemap ioctl failed; ``errno`` is the kernel's reason."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


def _ioctl(fd: int, request: int, argument: ctypes.Structure, what: str) -> int:
    result = _libc.ioctl(fd, request, ctypes.addressof(argument))
    if result < 0:
        code = ctypes.get_errno()
        raise UffdError(f"{what}: {os.strerror(code)} (errno {errno.errorcode.get(code, code)})", code)
    return result


def syscall_number() -> int:
    """The userfaultfd system call number of this machine."""
    number = _SYSCALL_USERFAULTFD.get(platform.machine())
    if number is None:
        raise TrackerError(f"userfaultfd: unknown syscall number on {platform.machine()}")
    return number


class UffdFile:
    """The ioctls of one userfaultfd descriptor (ours, or our pidfd_getfd copy of another process's:
    they then act on that process's address space). Owns and closes the descriptor."""

    def __init__(self, fd: int):
        self.fd = fd

    def api(self, features: int) -> None:
        """The one UFFDIO_API handshake of the descriptor, asking for ``features``."""
        api = _UffdioApi(api=_UFFD_API, features=features)
        _ioctl(self.fd, _UFFDIO_API, api, f"userfaultfd UFFDIO_API with features {features:#x} (WP_ASYNC needs "
               "Linux >= 6.7)")

    def register(self, start: int, length: int) -> None:
        """Register [start, start+length) for async write-protect and write-protect it (every page clean)."""
        register = _UffdioRegister(range=_UffdioRange(start, length), mode=_UFFDIO_REGISTER_MODE_WP)
        _ioctl(self.fd, _UFFDIO_REGISTER, register, f"UFFDIO_REGISTER of {length} bytes at {start:#x}")
        protect = _UffdioWriteprotect(range=_UffdioRange(start, length), mode=_UFFDIO_WRITEPROTECT_MODE_WP)
        _ioctl(self.fd, _UFFDIO_WRITEPROTECT, protect, f"UFFDIO_WRITEPROTECT of {length} bytes at {start:#x}")

    def unregister(self, start: int, length: int, missing_ok: bool = False) -> None:
        """Unregister a range; with ``missing_ok`` a range that is no longer mapped is fine."""
        try:
            _ioctl(self.fd, _UFFDIO_UNREGISTER, _UffdioRange(start, length),
                   f"UFFDIO_UNREGISTER of {length} bytes at {start:#x}")
        except UffdError as exc:
            if not (missing_ok and exc.errno in (errno.EINVAL, errno.ENOMEM, errno.ESRCH)):
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PagemapScanner:
    """PAGEMAP_SCAN over one process's ``/proc/PID/pagemap``: which pages of a range are in a category."""

    def __init__(self, pid: int | str = "self", vector_len: int = 4096):
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.vector_len = vector_len  # page_region entries per call; longer answers take more calls
        path = f"/proc/{pid}/pagemap"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TrackerError(f"cannot open {path}: {exc.strerror}") from None
        self._vector = (_PageRegion * vector_len)()
        self._vector_array = np.frombuffer(memoryview(self._vector).cast("B"), dtype=np.uint64).reshape(vector_len, 3)

    def written(self, start: int, length: int) -> np.ndarray:
        """Addresses of pages written since they were last write-protected; write-protects them again."""
        return self._scan(start, length, _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, _PAGE_IS_WRITTEN, 0,
                          "(region unmapped or not armed?)")

    def resident(self, start: int, length: int) -> np.ndarray:
        """Addresses of pages present in memory or swapped out (the others were never written)."""
        return self._expand(self.resident_ranges(start, length))

    def resident_ranges(self, start: int, length: int) -> np.ndarray:
        """The [start, end) address ranges (uint64 rows) of pages present in memory or swapped out."""
        return self._scan(start, length, 0, 0, _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED, "", expand=False)

    def _scan(self, start: int, length: int, flags: int, category_mask: int, anyof_mask: int, hint: str,
              expand: bool = True) -> np.ndarray:
        if start % self.page_size or length % self.page_size:
            raise TrackerError(f"range {start:#x}+{length} is not page aligned ({self.page_size} bytes)")
        end = start + length
        found: list[np.ndarray] = []
        while start < end:
            scan = _PmScanArg(size=ctypes.sizeof(_PmScanArg), flags=flags, start=start, end=end,
                              vec=ctypes.addressof(self._vector), vec_len=self.vector_len,
                              category_mask=category_mask, category_anyof_mask=anyof_mask,
                              return_mask=category_mask | anyof_mask)
            count = _ioctl(self._fd, _PAGEMAP_SCAN, scan, f"PAGEMAP_SCAN of {end - start} bytes at {start:#x} {hint}")
            if count:
                ranges = self._vector_array[:count, :2]
                found.append(self._expand(ranges) if expand else ranges.copy())
            if scan.walk_end <= start:
                raise TrackerError(f"PAGEMAP_SCAN made no progress at {start:#x}")
            start = scan.walk_end
        if found:
            return np.concatenate(found)
        return np.empty(0 if expand else (0, 2), dtype=np.uint64)

    def _expand(self, ranges: np.ndarray) -> np.ndarray:
        """[start, end) address ranges -> one address per page."""
        if not len(ranges):
            return np.empty(0, dtype=np.uint64)
        page = np.uint64(self.page_size)
        counts = ((ranges[:, 1] - ranges[:, 0]) // page).astype(np.int64)
        firsts = np.repeat(ranges[:, 0], counts)
        offsets = np.arange(int(counts.sum()), dtype=np.uint64) - np.repeat(
            (np.cumsum(counts) - counts).astype(np.uint64), counts)
        return firsts + offsets * page

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class WriteTracker:
    """Written-page tracking for ranges of this process's memory.

    ``register(start, length)`` arms a page-aligned range; ``collect(start,
    length)`` returns the addresses of the pages written since the last call
    (or since registration) and re-arms them. Raises TrackerError with the
    kernel's reason if the facility is missing.
    """

    def __init__(self) -> None:
        fd = _libc.syscall(syscall_number(), os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        if fd < 0:
            code = ctypes.get_errno()
            hint = " (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE?)" if code == errno.EPERM else ""
            raise TrackerError(f"userfaultfd: {os.strerror(code)}{hint}")
        self._uffd = UffdFile(fd)
        try:
            self._uffd.api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            self.scanner = PagemapScanner()
        except BaseException:
            self.close()
            raise

    def register(self, start: int, length: int) -> None:
        """Arm write tracking on [start, start+length); both page aligned."""
        if start % self.scanner.page_size or length % self.scanner.page_size:
            raise TrackerError(f"range {start:#x}+{length} is not page aligned ({self.scanner.page_size} bytes)")
        self._uffd.register(start, length)

    def collect(self, start: int, length: int) -> np.ndarray:
        """Addresses (uint64) of pages written in the range since the last collect; re-arms them."""
        return self.scanner.written(start, length)

    def close(self) -> None:
        """Release the userfaultfd (which disarms every range) and the pagemap file."""
        if getattr(self, "scanner", None) is not None:
            self.scanner.close()
        if getattr(self, "_uffd", None) is not None:
            self._uffd.close()

    def __del__(self) -> None:
        self.close()
