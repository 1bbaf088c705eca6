"""Fixtures shared by the test modules.

Helper modules (no tests in them) sit beside the tests and are imported by
name: ``serverutil`` (real servers in subprocesses, raw RESP helpers),
``replutil`` (primaries and replicas), ``storeutil`` (embedded stores on
hugepages), ``fakeserver`` (a scriptable fake native server for the client).

``pytest -m "not slow"`` skips the long tests (see the ``slow`` marker in
pyproject.toml) and runs in well under a minute.
"""

import contextlib

import pytest

from fakeserver import FakeServer
from storeutil import reserved_2m


@pytest.fixture
def fake():
    """A running :class:`fakeserver.FakeServer`."""
    with FakeServer() as server:
        yield server


@pytest.fixture
def reserve_2m():
    """``reserve_2m(n)``: make ``n`` 2 MiB hugepages free for the rest of the
    test (given back after it), or skip with the reason
    (:func:`storeutil.reserved_2m`)."""
    with contextlib.ExitStack() as stack:
        yield lambda n: stack.enter_context(reserved_2m(n))
