"""Transparent huge pages for fresh buffers: a leaf (stdlib only), so that io/ and kernels/ can
advise the buffers they allocate without importing the memory planner."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14
_libc: ctypes.CDLL | None = None


def advise_huge_pages(address: int, size: int) -> None:
    """Ask Linux to back the 2 MiB-aligned part of a fresh buffer with transparent huge pages
    (where THP is set to `madvise`): with freed buffers given back to the system, every buffer
    is fresh memory, and one fault per 2 MiB instead of per 4 KiB keeps that cheap. Advice only:
    nothing changes where it is not supported."""
    global _libc
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + size) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return
    import ctypes.util  # here: ctypes is 5 ms of the header-only commands, which never call this

    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
