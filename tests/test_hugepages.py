"""Huge pages for memory mapped inside a block (the packed decode weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alignkit.hugepages import _HUGE_PAGE, _whole_huge_pages, back_with_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_regions_are_cut_to_whole_huge_pages():
    page = _HUGE_PAGE
    regions = {
        0: 6 * page + 5,  # from its start to its last whole page
        20 * page + 7: 24 * page,  # from the first whole page in it
        30 * page: 30 * page + 100,  # smaller than one huge page: nothing
    }
    assert _whole_huge_pages(regions) == [(0, 6 * page), (21 * page, 24 * page)]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are a Linux feature, here turned off",
)
def test_anonymous_memory_is_backed_by_huge_pages():
    tensor = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MB, its own mapping
    start = _huge_kb()
    assert back_with_huge_pages() >= 30 << 20
    gained = _huge_kb() - start
    if gained == 0:
        pytest.skip("this kernel cannot collapse memory into huge pages (MADV_COLLAPSE)")
    assert gained >= 16 << 10  # at least half of it, in kB
    assert int(tensor.sum()) == 32 << 20  # the values stay
