"""Fixtures shared by the test modules.

Helper modules (no tests in them) sit beside the tests and are imported by
name: ``serverutil`` (real servers in subprocesses, raw RESP helpers),
``replutil`` (primaries and replicas), ``storeutil`` (embedded stores on
hugepages), ``fakeserver`` (a scriptable fake native server for the client).

``pytest -m "not slow"`` skips the long tests (see the ``slow`` marker in
pyproject.toml) and runs in well under a minute.
"""

import pytest

from fakeserver import FakeServer


@pytest.fixture
def fake():
    """A running :class:`fakeserver.FakeServer`."""
    with FakeServer() as server:
        yield server
