"""The SIGBUS handler seen from outside: what must still kill the process,
how our handler sits among other SIGBUS handlers (faulthandler, a Python
signal.signal handler), and crash regressions of the native arena.

Everything here runs in a fresh interpreter (python -c) because the expected
outcome is often the death of that interpreter; the test checks how it died.
Under the CI's ASan run the children inherit LD_PRELOAD, so ASan's own SIGBUS
handler (installed before ours) is the one ours chains to: the child then
dies with ASan's report instead of the signal, which is accepted as a death
by SIGBUS only when ASan says "BUS".
"""
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvstore import hugepages

ROOT = Path(__file__).resolve().parent.parent
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")

PRELUDE = """
import ctypes, mmap, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]

def beyond_eof_mapping():
    # A shared mapping of an empty file: every load from it raises SIGBUS
    # (BUS_ADRERR) - a bug's SIGBUS that has nothing to do with an arena.
    fd = os.memfd_create("empty")
    addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    return addr

def say(*a):
    print(*a, flush=True)
"""


def child_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("PYTHONFAULTHANDLER", "KVSTORE_ALLOW_HWPOISON"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_child(code, timeout=60, **kw):
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT,
                          env=child_env(), capture_output=True, timeout=timeout, **kw)


def describe(proc):
    return (f"returncode {proc.returncode}\n--- stdout\n{proc.stdout.decode(errors='replace')[-2000:]}"
            f"\n--- stderr\n{proc.stderr.decode(errors='replace')[-3000:]}")


def assert_killed_by_sigbus(proc):
    if proc.returncode == -signal.SIGBUS:
        return
    if UNDER_ASAN and proc.returncode not in (0, None) and b"AddressSanitizer" in proc.stderr \
            and b"BUS" in proc.stderr:
        return
    pytest.fail("expected death by SIGBUS, got " + describe(proc))


def assert_clean_exit(proc):
    assert proc.returncode == 0, describe(proc)


# ============================================================ SIGBUS that must kill

@pytest.mark.parametrize("how", ["raw_load", "ctypes", "python_mmap"])
def test_sigbus_outside_any_arena_kills(how):
    proc = run_child(f"""
        import kvstore._native as n
        assert n.handler_installed()
        a = n.Arena(1 << 20, "4K")            # arenas exist; the fault is elsewhere
        a.inject(8192, "ao")
        how = {how!r}
        if how == "python_mmap":
            fd = os.memfd_create("shrinks")
            os.ftruncate(fd, 4096)
            m = mmap.mmap(fd, 4096)
            os.ftruncate(fd, 0)               # the classic: the file shrank under the map
            say("ready")
            m[100]
        else:
            addr = beyond_eof_mapping()
            say("ready")
            if how == "raw_load":
                n._raw_load(addr)
            else:
                ctypes.string_at(addr, 1)
        say("survived")
    """)
    assert b"ready" in proc.stdout, describe(proc)
    assert b"survived" not in proc.stdout, describe(proc)
    assert_killed_by_sigbus(proc)


def test_unguarded_touch_of_a_faulting_4k_arena_page_kills():
    proc = run_child("""
        import kvstore, kvstore._native as n
        a = n.Arena(1 << 20, "4K", "keep_ue")
        a.write(0, b"x" * (1 << 20))
        a.inject(3 * 4096 + 10, "ar")             # a real faulting mapping over subpage 3
        say("neighbour", n._raw_load(a.address + 2 * 4096), n._raw_load(a.address + 4 * 4096))
        try:
            a.read(3 * 4096, 1)
        except kvstore.MemoryFaultError as e:
            say("guarded", e.offset)
        n._raw_load(a.address + 3 * 4096 + 5)     # a bug in the store: must not be hidden
        say("survived")
    """)
    assert b"neighbour 120 120" in proc.stdout, describe(proc)
    assert b"guarded 12288" in proc.stdout, describe(proc)
    assert b"survived" not in proc.stdout, describe(proc)
    assert_killed_by_sigbus(proc)


@pytest.fixture
def two_free_2m_pages():
    try:
        st = hugepages.size_status("2M")
        before = st["nr_hugepages"] - st["surplus_hugepages"]
        avail = hugepages.ensure_free("2M", 2)
    except OSError as e:
        pytest.skip(f"2M pages: {e}")
    if avail < 2:
        pytest.skip(f"2M pages: need 2 free, the kernel gave {avail}")
    st = hugepages.size_status("2M")
    added = max(0, st["nr_hugepages"] - st["surplus_hugepages"] - before)
    yield
    if added:
        hugepages.release("2M", added)


def test_unguarded_touch_of_a_lost_mainline_hugepage_kills(two_free_2m_pages):
    proc = run_child("""
        import kvstore, kvstore._native as n
        a = n.Arena(4 << 20, "2M", "mainline")
        a.write(0, b"y" * (4 << 20))
        a.inject(3 * 4096, "ao")                  # page 0 is lost as a whole and faults
        say("lost", len(a.lost_subpages()))
        say("other page", n._raw_load(a.address + (2 << 20) + 5))
        say("pread", a.pread(100 * 4096, 4)) 
        n._raw_load(a.address + 100 * 4096)       # healthy bytes, but the mapping faults
        say("survived")
    """)
    assert b"lost 512" in proc.stdout, describe(proc)
    assert b"other page 121" in proc.stdout, describe(proc)
    assert b"pread b'yyyy'" in proc.stdout, describe(proc)
    assert b"survived" not in proc.stdout, describe(proc)
    assert_killed_by_sigbus(proc)


def test_kill_bus_from_outside_kills():
    child = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent("""
            import kvstore._native as n
            a = n.Arena(1 << 20, "4K")
            a.inject(0, "ao")
            say("ready", n.handler_installed())
            sys.stdin.read()
            say("survived")
        """)],
        cwd=ROOT, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = child.stdout.readline()
        assert line == b"ready True\n", line + child.stderr.read()
        os.kill(child.pid, signal.SIGBUS)            # SI_USER: never an arena fault
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    proc = subprocess.CompletedProcess(child.args, child.returncode, line + out, err)
    assert b"survived" not in proc.stdout, describe(proc)
    assert_killed_by_sigbus(proc)


# ============================================================ chaining order

def test_faulthandler_enabled_before_import_is_chained_to():
    proc = run_child("""
        import faulthandler
        faulthandler.enable()
        import kvstore, kvstore._native as n
        say("installed", n.handler_installed())
        a = n.Arena(1 << 20, "4K")
        a.inject(4096, "ar")
        try:
            a.read(4096, 8)                        # ours handles arena faults...
        except kvstore.MemoryFaultError:
            say("guarded fault handled")
        n._raw_load(beyond_eof_mapping())          # ...and passes the rest on
        say("survived")
    """)
    assert b"installed True" in proc.stdout, describe(proc)
    assert b"guarded fault handled" in proc.stdout, describe(proc)
    assert b"survived" not in proc.stdout, describe(proc)
    if not UNDER_ASAN:
        assert proc.stderr.count(b"Fatal Python error: Bus error") == 1, describe(proc)
    assert_killed_by_sigbus(proc)


def _limit_output():
    # A child that loops printing crash reports dies of SIGXFSZ at 1 MiB
    # instead of filling the disk (Python ignores SIGXFSZ: the child restores it).
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_faulthandler_enabled_after_import_still_dies(tmp_path):
    # Regression: our handler and faulthandler (which restores "its previous"
    # handler, ours, and re-raises) used to pass the signal to each other forever.
    log = tmp_path / "stderr"
    with open(log, "wb") as err:
        proc = subprocess.run(
            [sys.executable, "-c", PRELUDE + textwrap.dedent("""
                import faulthandler
                import kvstore, kvstore._native as n
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # see _limit_output
                faulthandler.enable()                  # replaces ours
                say("after faulthandler", n.handler_installed())
                a = n.Arena(1 << 20, "4K")             # a new arena puts ours back on top
                say("after Arena", n.handler_installed())
                a.inject(4096, "ar")
                try:
                    a.read(4096, 8)
                except kvstore.MemoryFaultError:
                    say("guarded fault handled")
                n._raw_load(beyond_eof_mapping())
                say("survived")
            """)],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=err, timeout=20,
            preexec_fn=_limit_output)
    proc.stderr = log.read_bytes()
    assert b"after faulthandler False" in proc.stdout, describe(proc)
    assert b"after Arena True" in proc.stdout, describe(proc)
    assert b"guarded fault handled" in proc.stdout, describe(proc)
    assert b"survived" not in proc.stdout, describe(proc)
    assert_killed_by_sigbus(proc)
    if not UNDER_ASAN:
        assert proc.stderr.count(b"Fatal Python error: Bus error") == 1, describe(proc)


def test_python_signal_handler_is_chained_to_after_reinstall():
    proc = run_child("""
        import kvstore, kvstore._native as n
        seen = []
        signal.signal(signal.SIGBUS, lambda sig, frame: seen.append(sig))
        say("after signal.signal", n.handler_installed())
        a = n.Arena(1 << 20, "4K")
        say("after Arena", n.handler_installed())
        a.inject(4096, "ar")
        try:
            a.read(4096, 8)
        except kvstore.MemoryFaultError as e:
            say("guarded", e.offset // 4096)
        os.kill(os.getpid(), signal.SIGBUS)          # not ours: chained to the Python handler
        for _ in range(100):
            if seen:
                break
        say("python handler ran", seen)
        c = n.signal_counts()
        say("chained", c["chained"], "adrerr", c["adrerr"])
        # Replaced again; install_handler() puts ours back explicitly.
        signal.signal(signal.SIGBUS, signal.SIG_IGN)
        say("replaced", n.handler_installed())
        n.install_handler()
        say("reinstalled", n.handler_installed())
        a.inject(8192, "ar")
        try:
            a.read(8192, 8)
        except kvstore.MemoryFaultError as e:
            say("guarded", e.offset // 4096)
        a.inject(3 * 4096, "ao")
        say("lost", a.lost_subpages())
    """)
    assert_clean_exit(proc)
    out = proc.stdout.decode()
    assert "after signal.signal False" in out, out
    assert "after Arena True" in out, out
    assert "guarded 1\n" in out and "guarded 2\n" in out, out
    assert f"python handler ran [{int(signal.SIGBUS)}]" in out, out
    assert "chained 1 adrerr 0" in out, out
    assert "replaced False" in out and "reinstalled True" in out, out
    assert "lost [1, 2, 3]" in out, out


def test_python_signal_handler_is_chained_to_every_time():
    # Regression: the "already chained" flag used to stick, so the second
    # user-sent SIGBUS skipped the chained handler and killed the process.
    # A handler we chain to that handles the signal and returns must get the
    # next one too (only a handler that re-raises is cut short, see above).
    proc = run_child("""
        import kvstore._native as n
        seen = []
        signal.signal(signal.SIGBUS, lambda sig, frame: seen.append(sig))
        a = n.Arena(1 << 20, "4K")
        for i in range(3):
            os.kill(os.getpid(), signal.SIGBUS)
            for _ in range(100):
                if len(seen) > i:
                    break
            say("handled", len(seen))
    """)
    assert proc.stdout == b"handled 1\nhandled 2\nhandled 3\n", describe(proc)
    assert_clean_exit(proc)


# ============================================================ crash regressions

def test_empty_accesses_at_the_end_of_the_arena():
    # 64 subpages: the lost bitmap is exactly one word, so a bounds slip
    # reads past it (ASan reports it; without ASan it passes silently).
    proc = run_child("""
        import kvstore._native as n
        a = n.Arena(64 * 4096, "4K")
        say(a.read(a.size, 0), a.write(a.size, b""), a.read(0, 0))
        a.inject(63 * 4096, "ao")
        say(a.read(a.size, 0), a.read(63 * 4096 - 1, 1))
    """)
    assert_clean_exit(proc)
    assert proc.stdout == b"b'' None b''\nb'' b'\\x00'\n", describe(proc)


def test_zero_length_pread():
    # Regression: the subpage loop bound underflowed for n == 0 at offset 0
    # (EIO or a crash) and pread(size, 0) indexed page_fd past its end.
    proc = run_child("""
        import kvstore._native as n
        a = n.Arena(64 * 4096, "4K")
        say(a.pread(4096, 0), a.pread(0, 0), a.pread(a.size, 0))
    """)
    assert_clean_exit(proc)
    assert proc.stdout == b"b'' b'' b''\n", describe(proc)


def test_arena_from_a_thread_that_exits():
    # Alternate signal stacks are made per thread and freed at thread exit;
    # faults on many short-lived threads must neither leak nor crash.
    proc = run_child("""
        import threading, kvstore, kvstore._native as n
        a = n.Arena(4 << 20, "4K")
        caught = []
        def work(i):
            a.inject(i * 4096, "ar")
            try:
                a.read(i * 4096, 1)
            except kvstore.MemoryFaultError as e:
                caught.append(e.offset // 4096)
            a.inject((i + 500) * 4096, "ao")
        for i in range(200):
            t = threading.Thread(target=work, args=(i,))
            t.start(); t.join()
        say(sorted(caught) == list(range(200)), len(a.lost_subpages()))
    """)
    assert_clean_exit(proc)
    assert proc.stdout == b"True 400\n", describe(proc)
