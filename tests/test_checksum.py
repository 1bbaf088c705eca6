"""XXH64 (kvstore/_native/checksum.[ch]) checked bit for bit against `xxhash`.

The C code is compiled here with gcc into a standalone driver
(tests/native/xxh64_driver.c), once plainly with -O2 and once with
AddressSanitizer + UBSan, so it is verified independently of the extension
build. Inputs sit in exactly sized heap buffers at several alignments, so an
over-read or a misaligned load fails the sanitized run.
"""
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import xxhash

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "kvstore" / "_native"
DRIVER_SRC = Path(__file__).resolve().parent / "native" / "xxh64_driver.c"

BUILDS = {
    "plain": ["-O2"],
    "sanitized": ["-O1", "-g", "-fno-omit-frame-pointer",
                  "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}

U64 = 2**64 - 1


def _child_env():
    # .ci/run runs pytest with libasan preloaded; gcc and the driver (which
    # links its own sanitizer runtime when needed) must not inherit that.
    env = dict(os.environ)
    for var in ("LD_PRELOAD", "PYTHONMALLOC"):
        env.pop(var, None)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


@pytest.fixture(scope="session", params=sorted(BUILDS))
def driver(request, tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot build the standalone XXH64 driver")
    out = tmp_path_factory.mktemp("xxh64") / f"xxh64_driver_{request.param}"
    cmd = [gcc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-UNDEBUG",
           *BUILDS[request.param], f"-I{NATIVE}",
           str(DRIVER_SRC), str(NATIVE / "checksum.c"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        if request.param == "sanitized" and "sanitize" in proc.stderr:
            pytest.skip(f"gcc cannot build with sanitizers here: {proc.stderr.strip()[:300]}")
        pytest.fail(f"building the XXH64 driver failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return out


def run_driver(driver, lines):
    """Feed command lines to the driver; return its output lines."""
    proc = subprocess.run([str(driver)], input="".join(l + "\n" for l in lines),
                          capture_output=True, text=True, env=_child_env(), timeout=120)
    assert proc.returncode == 0, f"driver exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert proc.stderr == "", proc.stderr[-4000:]
    out = proc.stdout.splitlines()
    assert len(out) == len(lines)
    return out


def one_shot_cmd(data, seed, align=0):
    return f"H {seed} {align} {bytes(data).hex()}"


def expected(data, seed):
    return f"{xxhash.xxh64_intdigest(bytes(data), seed):016x}"


def test_known_vectors(driver):
    # Published reference digests, independent of the xxhash package.
    cases = [(b"", 0, 0xEF46DB3751D8E999),
             (b"a", 0, 0xD24EC4F1A98C6E5B),
             (b"abc", 0, 0x44BC2CF5AD770999)]
    out = run_driver(driver, [one_shot_cmd(d, s) for d, s, _ in cases])
    assert out == [f"{want:016x}" for _, _, want in cases]


def test_every_length_0_to_300_random_seeds_and_alignments(driver):
    rng = random.Random(0x5EED)
    lines, want = [], []
    for length in range(301):
        for _ in range(4):
            data = rng.randbytes(length)
            seed = rng.choice([0, 1, U64, rng.getrandbits(64), rng.getrandbits(32)])
            align = rng.randrange(8)
            lines.append(one_shot_cmd(data, seed, align))
            want.append(expected(data, seed))
    assert run_driver(driver, lines) == want


def test_structured_inputs(driver):
    # All-zero, all-0xff and repeating inputs around the 4/8/32-byte edges.
    lines, want = [], []
    for length in (1, 3, 4, 5, 7, 8, 9, 15, 16, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128):
        for fill in (b"\x00", b"\xff", b"\x80", b"ab"):
            data = (fill * length)[:length]
            for seed in (0, U64, 0x9E3779B185EBCA87):
                lines.append(one_shot_cmd(data, seed, align=length % 8))
                want.append(expected(data, seed))
    assert run_driver(driver, lines) == want


def test_large_inputs(driver):
    rng = random.Random(42)
    sizes = [1000, 4096, 4097, 65536 + 13, 1 << 20, (1 << 20) + 31]
    data = [rng.randbytes(n) for n in sizes]
    seeds = [rng.getrandbits(64) for _ in sizes]
    out = run_driver(driver, [one_shot_cmd(d, s, align=i % 8)
                              for i, (d, s) in enumerate(zip(data, seeds))])
    assert out == [expected(d, s) for d, s in zip(data, seeds)]


def _random_split(rng, data):
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 8)))
    # Duplicated cut points give empty chunks, which must be harmless.
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def test_streaming_matches_one_shot_at_every_prefix(driver):
    rng = random.Random(7)
    lines, want = [], []
    lengths = list(range(0, 130)) + [255, 256, 257, 1000, 4096, 10007, 200000]
    for length in lengths:
        for _ in range(3):
            data = rng.randbytes(length)
            seed = rng.getrandbits(64)
            chunks = _random_split(rng, data)
            lines.append(f"S {seed} " + ":".join(c.hex() for c in chunks))
            digests = [expected(b"", seed)]
            done = 0
            for c in chunks:
                done += len(c)
                digests.append(expected(data[:done], seed))
            want.append(" ".join(digests))
    assert run_driver(driver, lines) == want


def test_streaming_byte_at_a_time(driver):
    rng = random.Random(11)
    data = rng.randbytes(100)
    seed = rng.getrandbits(64)
    out = run_driver(driver, [f"S {seed} " + ":".join(data[i:i + 1].hex() for i in range(100))])
    assert out == [" ".join(expected(data[:n], seed) for n in range(101))]


def test_driver_rejects_garbage(driver):
    # The harness itself must be able to fail (bad input is an error, not a digest).
    proc = subprocess.run([str(driver)], input="H 0 0 zz\n", capture_output=True,
                          text=True, env=_child_env(), timeout=30)
    assert proc.returncode != 0
    assert "bad hex" in proc.stderr


# --- the extension's binding -------------------------------------------------

def _native_xxh64():
    try:
        from kvstore import _native
    except ImportError:
        return None
    return getattr(_native, "xxh64", None)


def test_extension_xxh64_matches_xxhash():
    xxh64 = _native_xxh64()
    if xxh64 is None:
        pytest.skip("kvstore._native.xxh64 not built yet")
    rng = random.Random(3)
    for length in list(range(301)) + [4096, 65537, 1 << 20]:
        data = rng.randbytes(length)
        seed = rng.getrandbits(64)
        assert xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed), (length, seed)
        assert xxh64(data, seed=seed) == xxhash.xxh64_intdigest(data, seed)
        assert xxh64(data) == xxhash.xxh64_intdigest(data, 0)
    data = rng.randbytes(200)
    want = xxhash.xxh64_intdigest(data[3:150], 5)
    assert xxh64(bytearray(data[3:150]), 5) == want
    assert xxh64(memoryview(data)[3:150], 5) == want
    assert xxh64(data, U64) == xxhash.xxh64_intdigest(data, U64)
    with pytest.raises(TypeError):
        xxh64("not bytes")
