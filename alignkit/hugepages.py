"""Huge pages for the packed weights a decode step streams from memory every call.

A decode step reads every packed weight once (about 270 MB in bf16 for the embedded
model), so at small batch it is bound by memory bandwidth, and with 4 KB pages that
stream also walks the page tables every 4 KB. Linux backs anonymous memory with
transparent huge pages only where a program asks for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, the usual default),
and the packed weights are allocated inside oneDNN, out of reach of such a request.

:func:`back_with_huge_pages` asks afterwards, for all of the process's writable
anonymous memory (its mappings and heap, from ``/proc/self/maps``: the packed
weights land in holes of the heap as well as in new mappings): ``MADV_HUGEPAGE``,
and ``MADV_COLLAPSE`` (Linux 6.1+) to move what is there now. Later allocations in
those ranges (the KV cache, activations) get huge pages too. Measured after
:func:`alignkit.models.load_sampler` on the embedded model (1 thread): a decode step
9-11% faster at batch 1 and ~3% at batch 32; the collapse costs ~1.3 s of CPU once
and backs ~550 MB (free holes of the heap become resident). Advising only the memory
mapped during packing got 4-7% at batch 1. Elsewhere (no ``/proc``, an older
kernel, huge pages turned off) it does nothing. ``MADV_COLLAPSE`` fails (EINVAL) on
the heap tcmalloc grows with ``sbrk``: under tcmalloc 106 MB ended on huge pages
against ~520 MB when tcmalloc maps its memory instead (``TCMALLOC_SKIP_SBRK=true``,
which :func:`alignkit.cli.runtime_env` sets).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux 6.1
_MAPS = "/proc/self/maps"


def _anonymous_regions() -> dict[int, int]:
    """start -> end of the process's writable anonymous mappings and its heap."""
    regions = {}
    with open(_MAPS) as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 5 and fields[5] != "[heap]":
                continue  # a file, the stack, vdso, ...
            if not fields[1].startswith("rw"):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions[start] = end
    return regions


def _whole_huge_pages(regions: dict[int, int]) -> list[tuple[int, int]]:
    """Each region cut to the whole huge pages inside it (none when it holds none)."""
    parts = []
    for start, end in regions.items():
        low = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        high = end & ~(_HUGE_PAGE - 1)
        if high > low:
            parts.append((low, high))
    return parts


def back_with_huge_pages() -> int:
    """Advise and collapse the process's anonymous memory into huge pages; bytes advised.

    0 where there is nothing to do it with (not Linux, no ``/proc``).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        parts = _whole_huge_pages(_anonymous_regions())
    except OSError:
        return 0
    advised = 0
    for low, high in parts:
        address, length = ctypes.c_void_p(low), ctypes.c_size_t(high - low)
        if libc.madvise(address, length, _MADV_HUGEPAGE) == 0:
            advised += high - low
            libc.madvise(address, length, _MADV_COLLAPSE)  # fails harmlessly before 6.1
    return advised
