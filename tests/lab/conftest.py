"""The kernel memory-failure lab: tests that make the real Linux
memory-failure code (``madvise(MADV_HWPOISON)``) produce the SIGBUS, instead
of the simulator.

They run only where real hwpoison may run: a kernel with
CONFIG_MEMORY_FAILURE, root, and ``KVSTORE_ALLOW_HWPOISON=1`` (poisoned memory
stays out of use until reboot). ``python -m tests.lab.run`` boots a throwaway
VM that has all of that and runs them there; everywhere else they skip and say
why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from . import scenarios

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab: real-kernel memory-failure lab; runs inside the lab VM (python -m tests.lab.run)")


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if HERE in Path(str(it.path)).resolve().parents]
    if not mine:
        return
    why = scenarios.hwpoison_unavailable_reason()
    if why is None:
        return
    mark = pytest.mark.skip(reason=f"kernel lab: {why}")
    for it in mine:
        it.add_marker(mark)


@pytest.fixture(scope="session")
def mce_helper(tmp_path_factory) -> str:
    """The second-process helper (mce_helper.c), compiled for this run."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build tests/lab/mce_helper.c")
    out = tmp_path_factory.mktemp("lab-helper") / "mce_helper"
    p = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(HERE / "mce_helper.c")], capture_output=True,
                       text=True)
    assert p.returncode == 0, f"mce_helper.c does not compile:\n{p.stderr}"
    return str(out)


_observed: dict[tuple[str, str], dict] = {}


def observe(scenario: str, ps: str, helper: str) -> dict:
    """Run a kernel scenario once per session (it poisons real memory) and
    record it for the comparison table; skip with the reason if it cannot
    run here."""
    key = (scenario, ps)
    if key not in _observed:
        try:
            obs = scenarios.run(scenario, ps, "kernel", helper=helper)
        except scenarios.Unavailable as e:
            obs = {"scenario": scenario, "page_size": ps, "mode": "kernel", "skipped": str(e)}
        _observed[key] = obs
        scenarios.record(obs)
    obs = _observed[key]
    if "skipped" in obs:
        pytest.skip(f"{scenario} on {ps} pages: {obs['skipped']}")
    return obs


@pytest.fixture(scope="module", params=["1G", "2M"])
def own(request, mce_helper):
    return observe("own", request.param, mce_helper)


@pytest.fixture(scope="module", params=["1G", "2M"])
def no_spare(request, mce_helper):
    return observe("no_spare", request.param, mce_helper)


@pytest.fixture(scope="module", params=["1G", "2M"])
def no_salvage(request, mce_helper):
    return observe("no_salvage", request.param, mce_helper)


@pytest.fixture(scope="module", params=["1G", "2M"])
def ao(request, mce_helper):
    return observe("ao", request.param, mce_helper)


@pytest.fixture(scope="module", params=["1G", "2M"])
def index(request, mce_helper):
    return observe("index", request.param, mce_helper)


@pytest.fixture
def child_env():
    env = dict(os.environ)
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONFAULTHANDLER", None)
    return env
