"""Dropping a file mapping's resident pages: read-only pages go (and come back on a read);
a mapping with written copy-on-write pages keeps them."""

from __future__ import annotations

import mmap
import os
import sys

import pytest

from edgekit.runtimes.mapped_pages import advise_random_access, file_mappings, release_file_pages

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


def _cold_mapping_resident(path, *, advise: bool, reads: int) -> int:
    """Resident bytes of a fresh mapping of `path`, evicted from the page cache first, after
    reading one byte in each of `reads` pages spread over it."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            if advise:
                assert advise_random_access(path) == 1
            stride = len(view) // reads // mmap.PAGESIZE * mmap.PAGESIZE
            sum(view[i * stride] for i in range(reads))
            return sum(m.resident_bytes for m in file_mappings(path))


def test_random_access_advice_maps_only_the_pages_read(tmp_path):
    """Table lookups by token id: without MADV_RANDOM each fault reads ahead and maps its
    neighbours (bench/RESULTS.md section 12: 41 -> 17 MiB of an ExecuTorch table per 128 ids)."""
    path = tmp_path / "table.data"
    path.write_bytes(os.urandom(4096 * mmap.PAGESIZE))
    reads = 32
    plain = _cold_mapping_resident(path, advise=False, reads=reads)
    if plain <= 2 * reads * mmap.PAGESIZE:
        pytest.skip("this filesystem reads no pages ahead of a fault")
    advised = _cold_mapping_resident(path, advise=True, reads=reads)
    assert advised <= 2 * reads * mmap.PAGESIZE < plain, (advised, plain)
