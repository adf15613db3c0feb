"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes import FakeSystem


@pytest.fixture
def fake() -> Iterator[FakeSystem]:
    """The fake kernel seam; its pipes and sockets are closed after the test."""
    f = FakeSystem()
    yield f
    f.close()
