"""Write snapshot files atomically, with O_DIRECT from page-aligned host buffers.

Layout of one host buffer (from :func:`aligned_empty`, laid out by :class:`.image.FileImage`)::

    | 8-byte length | JSON header | tensor data ...             | slack to a 4096 multiple |
    ^ page-aligned                ^ training copies W here (copy_ into the typed views)

The whole file image starts on a page boundary, so the writer sends it to the disk
with O_DIRECT straight from the buffer: no page cache, no second copy. The file is
written as ``.<name>.tmp-<pid>`` in the destination directory and renamed into place.

Atomic visibility (what a reader or a crash can see):

* The final name only ever appears through ``rename(2)`` of a temporary whose every
  ``write`` has returned (and, with ``fsync=True``, whose ``fsync`` has returned), so
  a reader never sees a partial file under the final name. ``rename`` replaces an
  existing file atomically: a reader opening the name gets the old file or the new.
* SIGKILL at any point: before the rename the final name is untouched (old state)
  and at most the dot-temporary is left; after it, the new complete file is there.
  This holds with ``fsync=False`` too, since a killed process loses no kernel state.
* Power loss / kernel crash: needs ``fsync=True``: the temporary's data and size are
  durable before the rename, and the directory is fsynced after it, so once
  :func:`write_snapshot_file` returns the new file survives; before that, either the
  old state or the new complete file (the rename is journaled as one operation).

O_DIRECT rules used here: buffer address, file offset and length must be multiples of the
file system's logical block size (512 B or 4096 B on common disks); we use 4096 everywhere.
The file's last partial block is written *without* O_DIRECT (``fcntl`` clears the flag for
the last < 4096 bytes), so the size is exact and no read-modify-write or truncate is needed.
Where O_DIRECT is refused (``open`` or ``write`` fails with EINVAL, e.g. ramfs, some
FUSE/overlay setups; tmpfs accepts it on recent kernels), the writer continues with buffered
writes, fsync, and ``posix_fadvise(DONTNEED)`` so the page cache does not fill with snapshot
files. Where the platform has no O_DIRECT, ``posix_fadvise`` or ``sync_file_range`` (macOS,
Windows; see :mod:`.osio`) the same bytes are written buffered and fsynced.

Public API: :func:`aligned_empty`, :func:`write_snapshot_file` (-> :class:`WriteInfo`),
:class:`GroupCommit` (several small files, one directory fsync), :func:`temporary_path`.
Measured in BENCHMARKS.md section 1b (``benchmarks/snapshot_io.py``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import osio
from .directory import fsync_dir
from .format import PAGE, temporary_name

ALIGN = PAGE  # >= the logical block size of common disks; the page size on x86-64 and most ARM Linux
BOUNCE_BYTES = 8 << 20  # staging buffer for tensors that are not already in an aligned image
STREAM_BYTES = 16 << 20  # buffered writes: start writeback every 16 MiB, drop the chunk before
MAX_IO = 1 << 30  # bytes per write() call (Linux caps one call at 2 GiB - 4 KiB)
SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = osio.SFR_WAIT_BEFORE, osio.SFR_WRITE, osio.SFR_WAIT_AFTER


def round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


HUGE = 2 << 20  # transparent huge page size on x86-64


def aligned_empty(nbytes: int, *, align: int = ALIGN, pin_memory: bool = False, prefault: bool = True,
                  huge: bool | None = None) -> torch.Tensor:
    """A uint8 tensor of ``round_up(nbytes, align)`` bytes whose first byte is ``align``-aligned.

    ``huge`` (default: for 2 MiB and more): an anonymous ``mmap`` aligned to 2 MiB with
    ``madvise(MADV_HUGEPAGE)``, so the buffer is made of 2 MiB pages. This matters for
    O_DIRECT: the block layer builds requests from physically contiguous segments, and
    from 4 KiB pages a virtio disk got ~512 KiB requests (143 for 77 MB) against ~2 MiB
    from huge pages (34); under load the former took 134-154 ms to write 77 MB, the
    latter 35-55 ms (measured when the writer was designed). The tensor keeps the mapping
    alive. Where anonymous maps do not exist (Windows) the buffer is an over-allocated
    torch tensor, aligned to ``align``.

    ``pin_memory=True`` (CUDA hosts): over-allocates with torch's pinned allocator and
    slices to ``align`` (no huge-page control there).

    ``prefault`` touches every page once, so the first snapshot copied into it does not
    pay the page faults (measured on a 2-core CPU machine: a cast into a fresh 77 MB tensor 112 ms, into a
    touched one 20 ms).
    """
    cap = round_up(max(int(nbytes), 1), align)
    if huge is None:
        huge = cap >= HUGE and not pin_memory
    if huge and not pin_memory and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE"):
        m = mmap.mmap(-1, cap + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = torch.frombuffer(m, dtype=torch.uint8)  # holds a reference to m
        off = (-raw.data_ptr()) % HUGE
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE, off, cap)
        buf = raw[off : off + cap]
    else:
        raw = torch.empty(cap + align, dtype=torch.uint8, pin_memory=pin_memory)
        off = (-raw.data_ptr()) % align
        buf = raw[off : off + cap]
    assert buf.data_ptr() % align == 0
    if prefault:
        buf.zero_()
    return buf


@dataclass
class WriteInfo:
    path: str
    nbytes: int
    method: str  # "direct" | "direct+bounce" | "buffered" | "buffered (fallback: ...)" | "buffered (under one 4096 B block)"
    seconds: float = 0.0
    write_s: float = 0.0
    fsync_s: float = 0.0
    direct_bytes: int = 0  # bytes that went through O_DIRECT
    fallback: str | None = None
    tmp: str | None = None


def temporary_path(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<pid>`` next to ``path`` (see :func:`.format.is_temporary`)."""
    p = Path(path)
    return p.with_name(temporary_name(p.name, os.getpid()))


def _mem(addr: int, n: int) -> memoryview:
    """A writable view of ``n`` bytes at ``addr`` (no copy). The owner must stay alive."""
    return memoryview((ctypes.c_char * n).from_address(addr)).cast("B")


_os_write = os.write  # module-level so tests can inject errors


def _write_all(fd: int, mv: memoryview) -> None:
    pos = 0
    while pos < len(mv):
        n = _os_write(fd, mv[pos : pos + MAX_IO])
        if n <= 0:  # pragma: no cover - write(2) returns >0 or raises
            raise OSError(errno.EIO, "short write")
        pos += n


def _find_image(header: bytes, tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """(address, total) if header+tensors already lie back to back in an aligned buffer.

    The buffer must own ``round_up(total)`` bytes from that address and start with the
    header's bytes (as :class:`.image.FileImage` leaves it).
    """
    parts = [t for t in tensors if t.numel() > 0]
    if not parts or any(t.device.type != "cpu" or not t.is_contiguous() for t in parts):
        return None
    base = parts[0].data_ptr() - len(header)
    if base % ALIGN:
        return None
    pos = parts[0].data_ptr()
    for t in parts:
        if t.data_ptr() != pos:
            return None
        pos += t.numel() * t.element_size()
    total = pos - base
    st = parts[0].untyped_storage()
    if not (st.data_ptr() <= base and base + round_up(total) <= st.data_ptr() + st.nbytes()):
        return None
    if any(t.untyped_storage().data_ptr() != st.data_ptr() for t in parts):
        return None
    if ctypes.string_at(base, len(header)) != header:
        return None
    return base, total


_local = threading.local()


def _bounce() -> torch.Tensor:
    b = getattr(_local, "bounce", None)
    if b is None:
        b = _local.bounce = aligned_empty(BOUNCE_BYTES)
    return b


def _pieces(header: bytes, tensors: list[torch.Tensor]):
    """(address, nbytes, keepalive) of everything the file holds, in order."""
    hb = ctypes.create_string_buffer(header, len(header))
    yield ctypes.addressof(hb), len(header), hb
    for t in tensors:
        if t.numel() == 0:
            continue
        if t.device.type != "cpu":
            raise ValueError("tensors must be on the CPU (copy into a host buffer first)")
        t = t.contiguous()
        yield t.data_ptr(), t.numel() * t.element_size(), t


class _Sink:
    """Writes a stream of bytes to ``fd``: O_DIRECT while it can, buffered after.

    Buffered bytes with ``stream=True`` are pushed to the disk as they go: after each
    STREAM_BYTES written, ``sync_file_range(WRITE)`` starts their writeback, and the
    chunk before is waited for and dropped from the page cache (``DONTNEED``). The
    final fsync then has little left to do and the cache never holds more than two
    chunks of the file. Where ``sync_file_range`` is missing or refused, the bytes are
    written plainly and the final fsync writes them back.
    """

    def __init__(self, fd: int, direct: bool, info: WriteInfo, stream: bool) -> None:
        self.fd, self.direct, self.info = fd, direct, info
        self.stream = stream
        self.pos = 0  # file offset
        self._synced = 0  # bytes from 0 whose writeback has been started
        self._dropped = 0  # bytes from 0 already waited for and dropped

    def _clear_direct(self) -> None:
        osio.clear_direct(self.fd)
        self.direct = False

    def write(self, mv: memoryview, aligned: bool) -> None:
        """Write ``mv``; ``aligned``: its address and length are multiples of ALIGN."""
        if self.direct and aligned and len(mv):
            try:
                _write_all(self.fd, mv)
                self.info.direct_bytes += len(mv)
                self.pos += len(mv)
                self._synced = self._dropped = self.pos  # O_DIRECT bytes are not in the cache
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._clear_direct()
                self.info.fallback = f"write O_DIRECT: {errno.errorcode.get(err.errno, err.errno)}"
                done = os.lseek(self.fd, 0, os.SEEK_CUR) - self.pos  # part of mv already written
                self.pos += done
                mv = mv[done:]
        if self.direct:  # an unaligned piece (the tail): clear O_DIRECT for the rest
            self._clear_direct()
        if not self.stream:
            _write_all(self.fd, mv)
            self.pos += len(mv)
            return
        done = 0
        while done < len(mv):
            if not self.stream:  # sync_file_range is not supported here: the rest plainly
                _write_all(self.fd, mv[done:])
                self.pos += len(mv) - done
                return
            n = min(STREAM_BYTES - (self.pos - self._synced), len(mv) - done)
            _write_all(self.fd, mv[done : done + n])
            done += n
            self.pos += n
            if self.pos - self._synced >= STREAM_BYTES:
                self._push()

    def _push(self) -> None:
        start, n = self._synced, self.pos - self._synced
        if not osio.sync_file_range(self.fd, start, n, SFR_WRITE):  # not here: plain writes from now on
            self.stream = False
            return
        self._synced = self.pos
        if self._dropped < start:  # the chunk before: wait for it, then drop it
            a, m = self._dropped, start - self._dropped
            if osio.sync_file_range(self.fd, a, m, SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER):
                osio.advise(self.fd, a, m, "DONTNEED")
            self._dropped = start


def _open_tmp(tmp: Path, direct: bool, info: WriteInfo) -> tuple[int, bool]:
    flags = osio.open_flags(os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    if direct and osio.direct_flag():
        try:
            return os.open(tmp, flags | osio.direct_flag(), 0o644), True
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            info.fallback = "open O_DIRECT: EINVAL"
    return os.open(tmp, flags, 0o644), False


def _write_body(fd: int, header: bytes, tensors: list[torch.Tensor], use_direct: bool, info: WriteInfo,
                stream: bool) -> None:
    w = _Sink(fd, use_direct, info, stream)
    image = _find_image(header, tensors) if use_direct else None
    if image is not None:  # zero copy: the aligned prefix straight from the caller's buffer
        base, total = image
        head = total - total % ALIGN
        if head:
            w.write(_mem(base, head), aligned=True)
        if total > head:
            w.write(_mem(base + head, total - head), aligned=False)
        info.method = "direct" if info.direct_bytes else "buffered (under one 4096 B block)"
        return
    if not use_direct:  # buffered: write every piece from where it lies
        for addr, n, keep in _pieces(header, tensors):
            w.write(_mem(addr, n), aligned=False)
            del keep
        return
    # direct, but the data is not in an aligned image: stage through an aligned bounce buffer
    bounce = _bounce()
    cap, fill = bounce.numel(), 0
    bptr = bounce.data_ptr()
    for addr, n, keep in _pieces(header, tensors):
        pos = 0
        while pos < n:
            k = min(cap - fill, n - pos)
            ctypes.memmove(bptr + fill, addr + pos, k)
            fill += k
            pos += k
            if fill == cap:
                w.write(_mem(bptr, cap), aligned=True)
                fill = 0
        del keep
    if fill:
        head = fill - fill % ALIGN
        if head:
            w.write(_mem(bptr, head), aligned=True)
        if fill > head:
            w.write(_mem(bptr + head, fill - head), aligned=False)
    info.method = "direct+bounce"


def write_snapshot_file(path: str | os.PathLike, header: bytes, tensors: list[torch.Tensor], fsync: bool = True,
                        direct: bool = True, *, drop_cache: bool = True, dir_fsync: bool | None = None,
                        rename: bool = True) -> WriteInfo:
    """Write ``header`` + the raw bytes of ``tensors`` (in order) to ``path`` atomically.

    ``direct``: O_DIRECT (zero copy when header+tensors lie in a :class:`.image.FileImage`,
    else through an 8 MiB aligned bounce buffer); falls back to buffered writes where
    O_DIRECT is refused or does not exist. ``fsync``: file fsync before the rename and a directory fsync
    after it (``dir_fsync`` overrides the latter; :class:`GroupCommit` does it once).
    ``drop_cache``: ``posix_fadvise(DONTNEED)`` after the fsync, so written pages do not
    stay cached (only clean pages can be dropped: without fsync it just starts writeback).
    ``rename=False`` leaves the complete temporary for the caller (used by GroupCommit).
    Returns a :class:`WriteInfo` saying which method was used.
    """
    t0 = time.perf_counter()
    path = Path(path)
    tmp = temporary_path(path)
    total = len(header) + sum(t.numel() * t.element_size() for t in tensors)
    info = WriteInfo(str(path), total, "buffered", tmp=str(tmp))
    fd = -1
    try:
        fd, use_direct = _open_tmp(tmp, direct, info)
        _write_body(fd, header, tensors, use_direct, info, stream=fsync and drop_cache)
        if info.fallback:
            info.method = f"buffered (fallback: {info.fallback})"
        elif info.method == "direct+bounce" and not info.direct_bytes:
            info.method = "buffered (under one 4096 B block)"
        t1 = time.perf_counter()
        info.write_s = t1 - t0
        if fsync:
            os.fsync(fd)
        if drop_cache and (fsync or info.direct_bytes < total):
            osio.advise(fd, 0, 0, "DONTNEED")
        info.fsync_s = time.perf_counter() - t1
        size = os.fstat(fd).st_size
        if size != total:  # pragma: no cover - would be a bug
            raise OSError(errno.EIO, f"{tmp}: wrote {size} bytes, expected {total}")
        os.close(fd)
        fd = -1
        if rename:
            os.replace(tmp, path)
            if fsync if dir_fsync is None else dir_fsync:
                fsync_dir(path.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    info.seconds = time.perf_counter() - t0
    return info


@dataclass
class CommitInfo:
    files: int
    nbytes: int
    seconds: float
    fsyncs: int
    infos: list[WriteInfo] = field(default_factory=list)


class GroupCommit:
    """Several small files made durable and visible together ("group commit").

    ``add()`` writes each file's complete temporary (buffered, no fsync, its
    writeback started at once so the files of a batch overlap); ``commit()``
    fsyncs every temporary, renames each into place in ``add()`` order, and fsyncs
    the directory once: N + 1 fsyncs for N files instead of 2N.

    Guarantee: a final name appears only by renaming a complete, durable
    temporary, so every visible file is complete after SIGKILL or power loss. A
    crash before ``commit()`` returns loses at most this batch: its files are
    either not renamed yet (complete dot-temporaries, removed at the next start)
    or renamed and complete. Visibility lags by at most one batch.
    """

    def __init__(self, directory: str | os.PathLike, *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._pending: list[WriteInfo] = []
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, path: str | os.PathLike, header: bytes, tensors: list[torch.Tensor]) -> WriteInfo:
        """Write one file's temporary (not visible yet)."""
        info = write_snapshot_file(path, header, tensors, fsync=False, direct=False, drop_cache=False, rename=False)
        self._pending.append(info)
        self.bytes += info.nbytes
        if self.fsync and osio.has_sync_file_range():
            fd = os.open(info.tmp, osio.open_flags(os.O_RDWR))
            try:  # start writeback now; commit() waits for it (fsync) where it is not supported
                osio.sync_file_range(fd, 0, 0, SFR_WRITE)
            finally:
                os.close(fd)
        return info

    def commit(self) -> CommitInfo:
        t0 = time.perf_counter()
        pending, self._pending, nbytes, self.bytes = self._pending, [], self.bytes, 0
        fsyncs = 0
        try:
            if self.fsync:
                for info in pending:
                    fd = os.open(info.tmp, osio.open_flags(os.O_RDWR))  # Windows fsyncs only writable files
                    try:
                        os.fsync(fd)
                        fsyncs += 1
                        osio.advise(fd, 0, 0, "DONTNEED")
                    finally:
                        os.close(fd)
            for info in pending:
                os.replace(info.tmp, info.path)
                info.tmp = None
            if self.fsync and pending:
                fsync_dir(self.directory)
                fsyncs += 1
        except BaseException:
            for info in pending:
                if info.tmp:
                    Path(info.tmp).unlink(missing_ok=True)
            raise
        return CommitInfo(len(pending), nbytes, time.perf_counter() - t0, fsyncs, pending)

    def abort(self) -> None:
        for info in self._pending:
            Path(info.tmp).unlink(missing_ok=True)
        self._pending, self.bytes = [], 0
