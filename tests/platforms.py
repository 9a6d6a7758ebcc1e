"""Take the Linux-only calls away, as macOS or Windows lack them, so the portable fallbacks run on Linux CI.

Nothing is faked: each call or module is removed from ``os``, ``mmap``, ``sys.modules`` or the libc that
``budget_callback.snapshots.osio`` reaches, and the product has to get by with what is left, as it would there.

* ``macos``: no ``O_DIRECT``, ``posix_fadvise``, ``RWF_NOWAIT``, ``preadv``, ``MADV_POPULATE_READ``,
  ``MADV_HUGEPAGE``; libc without ``sync_file_range`` and ``process_vm_readv``.
* ``windows``: all of that, and no ``pread``, ``pwrite``, ``O_CLOEXEC``, ``sysconf``, no ``MAP_*`` / ``PROT_*`` /
  ``MADV_*``, no ``fcntl`` or ``resource`` module, no libc through ctypes.

``take_away(mode, patch)`` works with pytest's ``monkeypatch`` (undone after the test) and, in a child process,
with a ``pytest.MonkeyPatch()`` that is never undone (see ``CHILD_PRELUDE``).
"""

from __future__ import annotations

import mmap
import os
import sys

from budget_callback.snapshots import osio

MODES = ("linux", "macos", "windows")

_OS = {
    "macos": ("O_DIRECT", "posix_fadvise", "POSIX_FADV_DONTNEED", "POSIX_FADV_WILLNEED", "RWF_NOWAIT", "preadv"),
    "windows": ("pread", "pwrite", "O_CLOEXEC", "sysconf"),
}
_MMAP = {
    "macos": ("MADV_POPULATE_READ", "MADV_HUGEPAGE"),
    "windows": ("MAP_SHARED", "MAP_PRIVATE", "MAP_ANONYMOUS", "PROT_READ", "PROT_WRITE", "MADV_RANDOM"),
}
_LIBC = {"macos": ("sync_file_range", "process_vm_readv")}
_MODULES = {"windows": ("fcntl", "resource")}


class _LibcWithout:
    """The real libc, less the functions named (as the C library of another system lacks them)."""

    def __init__(self, libc, missing: tuple[str, ...]) -> None:
        self._libc, self._missing = libc, missing

    def __getattr__(self, name: str):
        if name in self._missing:
            raise AttributeError(name)
        return getattr(self._libc, name)


def take_away(mode: str, patch) -> None:
    """Remove what ``mode`` lacks (``linux``: nothing); ``patch`` is a pytest ``MonkeyPatch``."""
    if mode == "linux":
        return
    levels = ("macos",) if mode == "macos" else ("macos", "windows")
    for level in levels:
        for name in _OS.get(level, ()):
            if hasattr(os, name):
                patch.delattr(os, name)
        for name in _MMAP.get(level, ()):
            if hasattr(mmap, name):
                patch.delattr(mmap, name)
        for name in _MODULES.get(level, ()):
            patch.setitem(sys.modules, name, None)  # ``import fcntl`` raises ImportError
    if mode == "windows":
        patch.setattr(osio, "LIBC", None)
    elif osio.LIBC is not None:
        patch.setattr(osio, "LIBC", _LibcWithout(osio.LIBC, _LIBC["macos"]))


_POSIX_FADVISE = getattr(os, "posix_fadvise", None)  # the test's own tool, kept before any test takes it away


def evict(path) -> None:
    """Drop ``path``'s pages from the page cache (a test's tool: Linux's posix_fadvise, whatever the mode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _POSIX_FADVISE(fd, 0, 0, 4)  # POSIX_FADV_DONTNEED
    finally:
        os.close(fd)


def child_prelude(mode: str, tests_dir: str) -> str:
    """Python source that a child process runs first to lack what ``mode`` lacks (torch is imported first: on
    Linux it binds ``mmap.MAP_PRIVATE`` at import, as the tests' own process did before any was taken away)."""
    return (f"import sys; sys.path.insert(0, {tests_dir!r}); import torch, pytest, platforms; "
            f"platforms.take_away({mode!r}, pytest.MonkeyPatch())\n")
