"""Every platform-specific call the snapshot files make, each with a portable fallback (no torch).

Linux gives the writer and the reader faster paths: ``O_DIRECT`` writes, ``posix_fadvise``,
``sync_file_range``, ``preadv`` with ``RWF_NOWAIT``, memory maps made and read through libc
(``mmap``, ``madvise``, ``mincore``, ``process_vm_readv``) and ``fcntl.flock``. macOS lacks some of
them and Windows most. Every call is looked up when it is made, so a platform without it (or a
test that takes it away) gets the fallback, which writes the same bytes and reads the same rows:

=============================  =====================================================================
Linux call                     fallback
=============================  =====================================================================
``O_DIRECT`` (+ ``fcntl``)     buffered writes
``posix_fadvise``              none (the page cache keeps the pages; nothing else changes)
``sync_file_range``            none (the final ``fsync`` writes everything back)
``preadv`` / ``RWF_NOWAIT``    ``pread`` per buffer, else ``lseek`` + ``read`` (one pass, no hint)
libc memory maps               rows read with the call above
``MADV_POPULATE_WRITE``        none (a result's pages are faulted in by its first write)
``fcntl.flock``                an exclusively created lock file (see :mod:`.directory`)
``resource`` / ``sysconf``     the bounds' defaults
=============================  =====================================================================

Return codes are checked: a libc call that fails raises ``OSError`` with its errno, except where the
failure only means "not supported here" (then the fallback is used from that call on).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import mmap
import os
import sys

_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE, errno.EPERM)


def module(name: str):
    """The standard-library module ``name`` (``fcntl``, ``resource``), or None where the platform has none."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)  # the process's own symbols (glibc, musl, macOS' libSystem)
    except (OSError, TypeError, AttributeError):  # Windows: CDLL(None) is a TypeError
        return None


LIBC = _load_libc()  # None: no libc reachable through ctypes (tests set it so)


def libc_function(name: str, restype, argtypes: tuple):
    """libc's ``name`` with its C signature, or None where there is no libc or no such function."""
    fn = getattr(LIBC, name, None) if LIBC is not None else None
    if fn is not None:
        fn.restype, fn.argtypes = restype, argtypes
    return fn


def libc_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


# --- opening -------------------------------------------------------------------------------------
def open_flags(flags: int) -> int:
    """``flags`` plus close-on-exec where it exists and binary mode where text mode exists (Windows)."""
    return flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def direct_flag() -> int:
    """``O_DIRECT``, or 0 where it does not exist or cannot be cleared again (no ``fcntl``)."""
    flag = getattr(os, "O_DIRECT", 0)
    return flag if flag and module("fcntl") is not None else 0


def clear_direct(fd: int) -> None:
    """Turn ``O_DIRECT`` off on an open ``fd`` (the file's unaligned tail goes through the page cache)."""
    fcntl = module("fcntl")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


# --- the page cache ------------------------------------------------------------------------------
def advise(fd: int, offset: int, length: int, advice: str) -> bool:
    """``posix_fadvise(fd, offset, length, POSIX_FADV_<advice>)``; False where it does not exist."""
    fadvise, code = getattr(os, "posix_fadvise", None), getattr(os, f"POSIX_FADV_{advice}", None)
    if fadvise is None or code is None:
        return False
    fadvise(fd, offset, length, code)
    return True


SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4


def has_sync_file_range() -> bool:
    return LIBC is not None and hasattr(LIBC, "sync_file_range")


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> bool:
    """Linux's ``sync_file_range``: True when done, False where unsupported (no call, or the file system
    refuses it); an I/O error (EIO, ENOSPC, ...) raises ``OSError``: the bytes did not reach the disk."""
    fn = libc_function("sync_file_range", ctypes.c_int, (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
    if fn is None:
        return False
    if fn(fd, offset, nbytes, flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"sync_file_range: {os.strerror(err)}")


# --- reading -------------------------------------------------------------------------------------
def has_nowait() -> bool:
    """Whether a read can be asked to fail fast when its bytes are not cached (``preadv`` + ``RWF_NOWAIT``)."""
    return bool(getattr(os, "RWF_NOWAIT", 0)) and hasattr(os, "preadv")


def read_nowait(fd: int, buffers, offset: int) -> int:
    """``preadv(fd, buffers, offset, RWF_NOWAIT)``: raises ``BlockingIOError`` when not cached; check
    :func:`has_nowait` first."""
    return os.preadv(fd, buffers, offset, os.RWF_NOWAIT)


def read_into(fd: int, buffers, offset: int) -> int:
    """Fill ``buffers`` (writable memoryviews, in order) from ``fd`` at ``offset``; the bytes read (fewer at
    the end of the file). ``preadv``, else ``pread`` per buffer, else ``lseek`` + ``read`` (the caller must not
    share ``fd`` between threads then)."""
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return preadv(fd, buffers, offset)
    pread = getattr(os, "pread", None)
    if pread is None:
        os.lseek(fd, offset, os.SEEK_SET)
    done = 0
    for buf in buffers:
        want, got = len(buf), 0
        while got < want:
            data = pread(fd, want - got, offset + done + got) if pread is not None else os.read(fd, want - got)
            if not data:
                return done + got
            buf[got:got + len(data)] = data
            got += len(data)
        done += want
    return done


def read_at(fd: int, nbytes: int, offset: int) -> bytes:
    """Up to ``nbytes`` bytes of ``fd`` from ``offset`` (fewer at the end of the file): ``pread``, else
    ``lseek`` + ``read`` (the caller must not share ``fd`` between threads then)."""
    pread = getattr(os, "pread", None)
    if pread is not None:
        return pread(fd, nbytes, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    parts, got = [], 0
    while got < nbytes:
        data = os.read(fd, nbytes - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+ (asm-generic/mman-common.h); not in Python's mmap before 3.13


def populate_write(address: int, nbytes: int) -> bool:
    """Fault in, writable, the whole pages of fresh anonymous memory in ``[address, address + nbytes)`` at once
    (``madvise(MADV_POPULATE_WRITE)``: the page faults a first write would take, without writing). False where
    it cannot (not Linux 5.14+, no libc): the first write faults them in, as it would anyway."""
    madvise = libc_function("madvise", ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    if madvise is None or not sys.platform.startswith("linux"):
        return False
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    return end <= start or madvise(start, end - start, getattr(mmap, "MADV_POPULATE_WRITE",
                                                              _MADV_POPULATE_WRITE)) == 0


def iov_max() -> int:
    """Buffers one ``preadv`` takes at most (1,024 where ``sysconf`` cannot say)."""
    try:
        return max(2, os.sysconf("SC_IOV_MAX"))
    except (AttributeError, ValueError, OSError):
        return 1024


# --- processes -----------------------------------------------------------------------------------
def process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this machine runs; None where that cannot be asked safely (Windows, where
    ``os.kill`` would terminate it)."""
    if os.name == "nt" or not hasattr(os, "kill"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    except OSError:
        return None
    return True
