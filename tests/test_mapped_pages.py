"""Dropping a file mapping's resident pages: read-only pages go (and come back on a read);
a mapping with written copy-on-write pages keeps them."""

from __future__ import annotations

import mmap
import sys

import pytest

from edgekit.runtimes.mapped_pages import file_mappings, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
PAGES = 64


def _file(tmp_path, name: str):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * (PAGES * mmap.PAGESIZE // 256))
    return path


def _touch(view: mmap.mmap) -> int:
    return sum(view[i] for i in range(0, len(view), mmap.PAGESIZE))


def test_read_pages_are_released_and_read_back_the_same(tmp_path):
    path = _file(tmp_path, "weights.data")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        before = _touch(view)
        assert sum(m.resident_bytes for m in file_mappings(path)) >= PAGES * mmap.PAGESIZE
        assert release_file_pages(path) >= PAGES * mmap.PAGESIZE
        assert sum(m.resident_bytes for m in file_mappings(path)) == 0
        assert _touch(view) == before


def test_a_mapping_with_written_pages_is_left_alone(tmp_path):
    path = _file(tmp_path, "written.data")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        _touch(view)
        view[0] = 255  # a private copy of the first page: dropping it would lose this byte
        assert file_mappings(path)[0].private_copies_bytes == mmap.PAGESIZE
        assert release_file_pages(path) == 0
        assert view[0] == 255 and sum(m.resident_bytes for m in file_mappings(path)) >= PAGES * mmap.PAGESIZE


def test_a_file_not_mapped_releases_nothing(tmp_path):
    assert file_mappings(_file(tmp_path, "other.data")) == []
    assert release_file_pages(tmp_path / "missing.data") == 0
