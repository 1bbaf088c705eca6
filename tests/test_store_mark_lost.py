"""Store.mark_lost: a peer's LOST key entered here as LOST, with no value."""

import pytest

from kvstore import Store
from kvstore.errors import KeyLostError


@pytest.fixture
def st():
    s = Store("16MiB", page_size="4K", recovery="manual")
    yield s
    s.close()


def test_marked_key_reads_lost_not_absent(st):
    assert st.mark_lost(b"k", 7) is True
    assert st.state(b"k") == "lost"
    assert st.exists(b"k")
    with pytest.raises(KeyLostError):
        st.get(b"k")
    assert (b"k", 7, "lost") in st.lost_keys()
    assert st.version >= 7
    st.recover()                      # no source: it stays LOST
    with pytest.raises(KeyLostError):
        st.get_versioned(b"k")


def test_rebuild_install_and_newer_write_clear_it(st):
    st.mark_lost(b"a", 10)
    assert st.install(b"a", b"old", 9) == "stale"     # older than the lost version
    assert st.install(b"a", b"right", 10) == "installed"
    assert st.get_versioned(b"a") == (10, b"right")
    st.mark_lost(b"b", 20)
    st.put_versioned(b"b", b"newer", 25, 0)
    assert st.get_versioned(b"b") == (25, b"newer")


def test_present_copy_at_or_above_the_version_wins(st):
    v = st.put(b"p", b"here")
    assert st.mark_lost(b"p", v) is False
    assert st.get(b"p") == b"here"
    assert st.mark_lost(b"p", v + 5) is True
    assert st.state(b"p") == "lost"


def test_rebuilt_from_source(st):
    st.rebuild_source = lambda reqs: {k: (mv, b"from-peer") for k, mv in reqs}
    st.mark_lost(b"s", 3)
    assert st.get(b"s") == b"from-peer"


def test_bad_arguments(st):
    with pytest.raises(ValueError):
        st.mark_lost(b"x", 0)
    assert st.mark_lost(b"L" * 2000, 5) is False      # long keys are lost by hash range
    assert st.state(b"L" * 2000) == "absent"
