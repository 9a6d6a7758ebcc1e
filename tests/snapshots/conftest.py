"""The writer, the reader and the lock run their tests three times: with Linux's calls, and with the calls
that macOS and Windows lack taken away (``tests/platforms.py``), so the portable fallbacks are tested on CI."""

import pytest

import platforms


@pytest.fixture(params=platforms.MODES)
def io_platform(request, monkeypatch) -> str:
    """``linux``, ``macos`` or ``windows``: the calls that platform lacks are gone for the test."""
    platforms.take_away(request.param, monkeypatch)
    return request.param
