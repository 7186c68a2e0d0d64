"""Fixtures for every test folder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder: a Unix socket path holds at most 107 bytes, pytest's tmp_path can be long."""
    path = Path(tempfile.mkdtemp(prefix="pdtui-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
