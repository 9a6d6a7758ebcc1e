"""osio: each platform call and its fallback, on real files, pipes and processes; the calls a platform lacks are
taken away for real (``tests/platforms.py``)."""

import errno
import os
import subprocess
import sys

import pytest

from budget_callback.snapshots import osio

pytestmark = pytest.mark.usefixtures("io_platform")  # linux, macos, windows: see conftest.py


def test_sync_file_range_checks_its_return_code(tmp_path, io_platform):
    """Done on a file; "not supported" on a pipe (ESPIPE: the fallback, fsync, is used); an error (a closed
    descriptor) raises with its errno instead of being ignored. Where libc has no such call: not supported."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10_000)
    fd = os.open(path, os.O_RDWR)
    read_end, write_end = os.pipe()
    try:
        supported = io_platform == "linux"
        assert osio.sync_file_range(fd, 0, 0, osio.SFR_WRITE) is supported
        assert osio.sync_file_range(write_end, 0, 0, osio.SFR_WRITE) is False
    finally:
        for d in (fd, read_end, write_end):
            os.close(d)
    if supported:
        with pytest.raises(OSError) as err:
            osio.sync_file_range(fd, 0, 0, osio.SFR_WRITE)  # closed above
        assert err.value.errno == errno.EBADF
    else:
        assert osio.sync_file_range(fd, 0, 0, osio.SFR_WRITE) is False


def test_read_into_fills_the_buffers_and_stops_at_the_end(tmp_path):
    """preadv, pread per buffer, or lseek + read: the same bytes in the same buffers, fewer at the end."""
    data = bytes(range(256)) * 40
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, osio.open_flags(os.O_RDONLY))
    try:
        a, b = bytearray(100), bytearray(3000)
        assert osio.read_into(fd, (memoryview(a), memoryview(b)), 7) == 3100
        assert bytes(a) == data[7:107] and bytes(b) == data[107:3107]
        tail = bytearray(50)
        assert osio.read_into(fd, (memoryview(tail),), len(data) - 20) == 20
        assert bytes(tail[:20]) == data[-20:]
    finally:
        os.close(fd)


def test_advise_says_whether_it_advised(tmp_path, io_platform):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert osio.advise(fd, 0, 0, "DONTNEED") is (io_platform == "linux")
    finally:
        os.close(fd)


def test_what_each_platform_has(io_platform):
    assert (osio.direct_flag() != 0) is (io_platform == "linux")
    assert osio.has_nowait() is (io_platform == "linux")
    assert osio.has_sync_file_range() is (io_platform == "linux")
    assert (osio.module("fcntl") is None) is (io_platform == "windows")
    assert osio.iov_max() == (1024 if io_platform == "windows" else os.sysconf("SC_IOV_MAX"))


def test_process_alive_asks_without_harm():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid runs no more
    assert osio.process_alive(os.getpid()) is True
    assert osio.process_alive(child.pid) is False
