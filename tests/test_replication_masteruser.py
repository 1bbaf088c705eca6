"""Replication as an ACL user (``--masteruser`` with ``--masterauth``).

Every node loads the same ACL file, in which the default user is off: an
``admin`` user for the test's own clients and a ``repl`` user with only
what nodes need of each other (``+sync +kv.fetch +ping`` on every key).
The replica links up and converges, the primary rebuilds a key lost to an
injected UE from the replica through the authenticated peer client, and a
wrong password or a user without ``+sync`` is refused: the replica logs
``event=primary_auth_refused`` once, counts ``kv_auth_failures`` and stays
down.
"""

import pytest

from kvstore.client import Client
from kvstore.errors import KeyLostError
from replutil import digest, info, log_events, rc, start, start_replica, wait_synced
from serverutil import store_available, wait_for

pytestmark = pytest.mark.skipif(not store_available(), reason="kvstore native engine not built")

ADMIN = dict(username="admin", password="adminpw")

ACL = """\
user default off
user admin on >adminpw ~* &* +@all
user repl on >replpw ~* +sync +kv.fetch +ping
user weak on >weakpw ~* +kv.fetch +ping
"""


@pytest.fixture
def aclfile(tmp_path):
    p = tmp_path / "users.acl"
    p.write_text(ACL)
    return str(p)


def admin_client(srv):
    return Client("127.0.0.1", srv.port, socket_timeout=20, **ADMIN)


def test_replica_syncs_and_rebuilds_as_the_masteruser(aclfile):
    # the primary fetches lost keys from its replica: it needs the
    # credentials too (every node of a group is given the same ones)
    cred = ("--masteruser", "repl", "--masterauth", "replpw")
    p = start("--aclfile", aclfile, *cred)
    r = None
    try:
        cp = admin_client(p)
        versions = {b"k%d" % i: cp.put(b"k%d" % i, b"v%d" % i) for i in range(200)}
        # the default user is off: an unauthenticated client gets nowhere
        with pytest.raises(Exception):
            Client("127.0.0.1", p.port, socket_timeout=5, retries=0).get(b"k1")
        r = start_replica(p, "--aclfile", aclfile, *cred)
        rp, rr = rc(p, **ADMIN), rc(r, **ADMIN)
        wait_for(lambda: rr.info("replication")["master_link_status"] == "up", 20,
                 what="link up as the repl user")
        cp.put(b"after", b"sync")
        wait_for(lambda: rr.get("after") == b"sync", 10, what="streamed write")
        ri = rr.info("replication")
        assert ri["kv_auth_failures"] == 0
        assert rr.execute_command("KV.DIGEST") == rp.execute_command("KV.DIGEST")
        # a key lost on the primary comes back from the replica over a peer
        # client that authenticates as repl (fetch needs +kv.fetch)
        cp.inject("ao", key=b"k7")
        assert cp.getv(b"k7") == (versions[b"k7"], b"v7")
        st = cp.stats()
        assert st["repl_peer_keys_fetched"] >= 1 and st["repl_peer_auth_failures"] == 0
        assert not log_events(r, "primary_auth_refused")
        assert not log_events(p, "peer_auth_refused")
        assert not log_events(p, "auth_failed")
    finally:
        if r is not None:
            r.stop()
        p.stop()


@pytest.mark.parametrize("user,pw,code", [("repl", "wrong", "NOAUTH"), ("weak", "weakpw", "NOPERM")])
def test_refused_replica_logs_and_stays_down(aclfile, user, pw, code):
    p = start("--aclfile", aclfile)
    r = None
    try:
        admin_client(p).put(b"k", b"v")
        r = start_replica(p, "--aclfile", aclfile, "--masteruser", user, "--masterauth", pw)
        rr = rc(r, **ADMIN)
        wait_for(lambda: rr.info("replication").get("kv_auth_failures", 0) >= 2, 15,
                 what="the refused replica to retry")
        ri = rr.info("replication")
        assert ri["master_link_status"] == "down"
        assert rr.get("k") is None
        assert rc(p, **ADMIN).info("replication")["connected_slaves"] == 0
        # one clear line, not one per retry
        lines = log_events(r, "primary_auth_refused")
        assert len(lines) == 1, r.log_tail()
        assert f"user={user}" in lines[0] and code in lines[0]
        assert not log_events(r, "primary_link_down")
    finally:
        if r is not None:
            r.stop()
        p.stop()


def test_masteruser_needs_a_password():
    from kvstore.server.config import load_config
    with pytest.raises(ValueError, match="masteruser needs a password"):
        load_config(["--masteruser", "repl"])
    cfg = load_config(["--masteruser", "repl", "--masterauth", "pw"])
    assert (cfg.masteruser, cfg.masterauth) == ("repl", "pw")


def test_masteruser_from_the_config_file_and_config_get(tmp_path, aclfile):
    conf = tmp_path / "kv.toml"
    conf.write_text('masteruser = "repl"\nmasterauth = "replpw"\n')
    p = start("--config", str(conf), "--aclfile", aclfile)
    try:
        assert rc(p, **ADMIN).config_get("masteruser") == {"masteruser": "repl"}
    finally:
        p.stop()


def test_digest_helpers_unchanged_for_open_servers():
    # replutil's helpers still speak to servers without ACLs
    p = start()
    r = start_replica(p)
    try:
        Client("127.0.0.1", p.port).put(b"a", b"b")
        wait_synced(p, r)
        assert digest(p) == digest(r) and info(r)["kv_auth_failures"] == 0
    finally:
        r.stop()
        p.stop()


def test_peer_refusing_the_rebuild_is_logged(aclfile):
    """A primary without credentials for its replica cannot rebuild from it:
    the key stays lost (reported as lost) and the refusal is logged once."""
    p = start("--aclfile", aclfile)
    r = start_replica(p, "--aclfile", aclfile, "--masteruser", "repl", "--masterauth", "replpw")
    try:
        cp = admin_client(p)
        cp.put(b"k", b"v")
        rr = rc(r, **ADMIN)
        wait_for(lambda: rr.get("k") == b"v", 20, what="replicated")
        cp.inject("ao", key=b"k")
        with pytest.raises(KeyLostError):
            cp.getv(b"k")
        wait_for(lambda: cp.stats()["repl_peer_auth_failures"] >= 2, 10, what="fetch retries")
        lines = log_events(p, "peer_auth_refused")
        assert len(lines) == 1 and f"peer=127.0.0.1:{r.port}" in lines[0], p.log_tail()
        assert "NOAUTH" in lines[0]
    finally:
        r.stop()
        p.stop()
